"""The /docs page: Swagger UI 5 over /openapi.json, served from the swagger-ui-py package (no CDN).

Swagger UI 5 is the first to read OpenAPI 3.1, the version of our document; swagger-ui-py ships it in a wheel
(a build locks wheels only), with light dependencies (jinja2, packaging, PyYAML), and follows its releases.

The document itself is built by bento_like.description, from the same description the codecs decode with.
"""

SWAGGER_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title} - API docs</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({{url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true}});
</script>
</body>
</html>
"""
