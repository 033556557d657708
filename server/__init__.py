"""deltaserve.server: engine, scheduler, model runner, gRPC API and metrics."""
