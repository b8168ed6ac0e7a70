"""One router per resource, included by service.app."""

from . import admin, health, images, page, search

__all__ = ["admin", "health", "images", "page", "search"]
