"""HTTP: the FastAPI app and everything that turns requests into calls and answers into JSON.

app.py           create_app: routers, middleware (guard/), error handlers, /static, lifespan
routes/          one router per resource: search, reports, facets, scores, explain, images,
                 uploads (a kept upload's pixels), admin, auth, health, page
deps.py          route dependencies: the service state, the Searcher, a leased index version,
                 the kept uploads, the caller and its role (guard/access.py), the request's
                 audit record
queries.py       request bodies (SearchControls, declared once; TextQuery, RefineQuery),
                 checked against index/read/limits.py
responses.py     response bodies, and the OpenAPI error entries of a route (errors())
query_params.py  SearchControls as form or query-string fields (SearchForm, SearchQuery: made
                 from its fields), request bodies to the search core's plain options
results.py       the search core's cards to response items (URLs built from ids), a Found to
                 a response's fields (timings included)
errors.py        every error as {"error": {...}} JSON (ApiError; the core's service.errors
                 kinds answered with their status), unexpected ones logged once
uploads.py       what an upload is (by its bytes), the region box of a query parsed
hosts.py         the Host header allow-list; docs.py: /docs served from local files
static/          the search page (plain HTML, CSS and JS), served at / and /static
"""
