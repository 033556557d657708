"""Fixtures shared by the tests and the benchmarks: tiny real models, real PEFT/AdapterHub adapter files of every
kind, and a real server on loopback in a background thread.

Installed as `deltaserve.testing` so that both import it by name. It may import `deltaserve.server`; nothing in
server/, adapters/ or client/ imports it. PEFT is imported only inside the functions that need it.
"""
