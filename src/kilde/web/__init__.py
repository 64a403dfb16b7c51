"""The ASGI application: collection endpoints, admin API, and (later) the dashboard."""
