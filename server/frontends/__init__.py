"""The front doors: native gRPC, TGIS and the OpenAI-compatible HTTP API, and the admin checks."""
