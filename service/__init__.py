"""The retrieval service: a FastAPI app over a model bundle and an index (`convirt serve`).

service/app.py       create_app: routers, middleware, error handlers, lifespan
service/settings.py  Settings: every CONVIRT_* setting in one pydantic class
service/routes/      one router per resource: search, reports (what similar cases said),
                     facets, explain, images, admin, auth, health, page
service/schemas.py   request and response bodies
service/searcher.py  the one owner of search: text, image, region, similar, refine, explain
service/grouping.py  one card per study or patient; feedback.py: refine by example (Rocchio)
service/engine.py    the model: decoding, micro-batched encoder calls in a model thread
service/stores.py    the served index version, swapped on reload without dropping requests
service/access.py    who is asking: API keys (keys.py, `convirt keys`), a sign-in proxy's
                     headers, roles and rate limits; deps.py turns them into route dependencies
service/audit/       the keyed, hash-chained audit log (`convirt audit`, docs/audit.md)
                     viewer.py: DICOM UIDs, PACS links
service/static/      the web page (plain HTML, CSS and JS)

The path of a text query, one way only:

    routes/search.py   its dependencies identify the caller (reader role) and open the audit
                       record; it checks the body (schemas.TextQuery), calls Searcher.text
    Searcher.text      embeds the sentence (engine: model thread, micro-batched), leases the
                       served index version, and in one hop to its search pool:
      IndexStore.rank_text  the image, its report's sentences and the words its report
                         asserts, fused (index.hybrid; mode=image: IndexStore.search alone);
                         filters, keywords and exclusions as one allowed-id set
      group_hits         one card per study, reading more hits until k cards are found
      describe_groups    response items with URLs built from ids
    routes/search.py   packs the Found into the response (the query and result ids, noted
                       by the Searcher, go to the audit log as the handler returns)
"""

__version__ = "0.1.0"
