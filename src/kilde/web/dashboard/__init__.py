"""The dashboard: server-rendered pages over the admin API (`routes.router`, mounted at `/`).

It adds no logic of its own: each page calls the functions the admin API's routes call (often
the route functions themselves) and renders their answers. Kept import-light on purpose:
`kilde.web.admin_api` imports `auth` from here.
"""
