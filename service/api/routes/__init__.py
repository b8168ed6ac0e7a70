"""One router per resource, included by service.api.app: search, reports (what similar cases
said), facets, explain, images, image_reports (an image's report by sentence), admin, auth,
health, page."""
