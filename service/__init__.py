"""The retrieval service: a FastAPI app over a model bundle and an index (`convirt serve`).

Four rooms, and what ties them together at the top:

    api/      HTTP: app.py (create_app: routers, middleware, error handlers, lifespan), routes/
              (one router per resource), queries.py and responses.py (the request and response
              bodies), query_params.py (form and query-string search fields), results.py (cards
              to response items), deps.py (route dependencies), errors.py (the core's refusals
              as HTTP too), uploads.py, hosts.py, docs.py, static/ (the web page)
    guard/    who may ask, and how much: access.py (keys, a sign-in proxy, roles), peers.py,
              rate_limit.py, startup.py (settings refused at start), keys.py and keys_cli.py
              (`convirt keys`), audit/ and audit_cli.py (the hash-chained audit log, `convirt
              audit`), limits.py (body and head size and time)
    search/   searcher.py (the one owner of search: text, image, region, similar, refine,
              suggest, facets, explain), find.py (what runs in the search pool), grouping.py
              (one card per study or patient), feedback.py (refine by example), cards.py
              (hits to plain cards), viewer.py (DICOM UIDs, PACS links), stores.py (the
              served index version, swapped on reload), pacs.py (indexed files, remote images
              fetched to view); plain options in, plain cards out, no HTTP
    model/    the model thread: engine.py (decoding, micro-batched encoder calls), batching.py,
              region.py (the Box of a region search), threads.py (the model thread and the
              search and decode pools), loading.py (the bundle and index read at start),
              explainer.py, explain_worker.py and explain_process.py (heat-maps off the
              model thread)

    settings.py (every CONVIRT_* setting), state.py (what one running service holds), cli.py
    (`convirt serve`), metrics.py (/metrics), logs.py, errors.py (what the core refuses:
    plain kinds, each answered with its HTTP status by api/errors.py).

The path of a text query, one way only, each room crossed once (route -> search core ->
index read -> result):

    api/routes/search.py   its dependencies (api/deps.py) identify the caller (guard/access.py,
                           reader role) and open the audit record (guard/audit/); it checks the
                           body (api/queries.py TextQuery: SearchControls, bounded by
                           index/read/limits.py), adapts it to plain SearchOptions
                           (api/query_params.py), notes the query in the audit record and
                           calls Searcher.text
    search/searcher.py     embeds the sentence (model/engine.py: the model thread, micro-batched;
                           stages queue and encode), leases the served version (search/stores.py)
                           and, in one hop to its search pool (model/threads.py), runs find:
      index/read/store.py  IndexStore.rank_text: the vector normalised (index/read/search.py, the
                           one place), filters, keywords and exclusions as one allowed-id set
                           (index/read/filters.py, keywords.py: stage filter), the image (FAISS:
                           stage faiss), its report's sentences and words, fused
                           (index/read/hybrid.py: stage reports); mode=image: IndexStore.search
      search/find.py       one card per study (search/grouping.py: stage grouping), reading more
                           hits until k cards are found (index/read/search.py widening, the one
                           over-fetch loop); the cards described (search/cards.py: stage
                           describe); one Found (search/query.py), its timings (ms per stage)
    api/routes/search.py   notes the result ids in the audit record and packs the Found into
                           the response (api/results.py, api/responses.py, `timings`
                           included); the Searcher put each stage in the histograms of
                           /metrics (metrics.py); the audit record goes to the audit log as
                           the route returns (stage audit, /metrics)

An image query adds the stage decode (model/engine.py, the decode pool) before queue; the
similar-cases and refine searches take the same path from search/searcher.py on. The stages'
names: index/read/timings.py; their breakdown on the demo index: bench/search_stages.py.

Where the common changes go:
- a new FAISS index type: index/faiss_index.py; nothing in service/ names a structure.
- a new endpoint: a router in api/routes/ (included in api/app.py), its bodies in
  api/queries.py and api/responses.py, its guards from api/deps.py (READER or ADMIN,
  AUDITED); work that reads the index goes through search/searcher.py.
- a new image source: index/sources/ only; the service fetches a remote image through
  index/sources/remote.py (search/pacs.py), whatever the protocol.
"""
