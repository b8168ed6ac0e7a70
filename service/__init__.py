"""The retrieval service: a FastAPI app over a model bundle and an index (`convirt serve`).

service/app.py       create_app: routers, middleware, error handlers, lifespan
service/settings.py  Settings: every CONVIRT_* setting in one pydantic class
service/routes/      one router per resource: search, images, admin, health, the page
service/schemas.py   request and response bodies
service/engine.py    the model: decoding, micro-batched encoder calls in a model thread
service/stores.py    the served index version, swapped on reload without dropping requests
service/static/      the web page (plain HTML, CSS and JS)
"""

__version__ = "0.1.0"
