"""Where adapters live: the registry over disk, host cache and device slots, and weighted mixes."""
