"""The FastAPI gateway (routes, protocol, admission, metrics). Built by the Serving issue."""
