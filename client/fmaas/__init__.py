"""Generated protobuf/gRPC modules for the TGIS-compatible API (proto package `fmaas`); `make proto` rewrites them."""
