"""One router per resource, included by service.api.app: search, reports (what similar cases
said), facets, explain, images, admin, auth, health, page."""
