"""The operator console: server-rendered pages under ``/_registry/ui/`` for administrators.

- :mod:`.pages`: the Quart views (their routes are declared with every other route, in
  ``registry_trio/api/routes.py``);
- :mod:`.health`: a sink's state and delivery rate from the queue's figures;
- :mod:`.csrf`: the token its forms carry;
- :mod:`.render`: Jinja2 templates (``templates/``, everything escaped) and the security
  headers of every page; ``static/`` holds the one script and stylesheet, served from here
  (no build step, nothing fetched from elsewhere).
"""
