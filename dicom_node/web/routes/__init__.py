"""The web page's routes by resource: ``auth`` (sign-in and out), ``studies`` (dashboard, study
page, actions, downloads), ``uploads`` (the upload form and post), ``ops`` (``/metrics``, ``/healthz``).
Each module's ``routes(site)`` returns its Starlette routes; ``web.app.build_app`` assembles them."""
