"""Every bound on what one search may ask, in one place.

The service checks a request against these first (service/api/queries.py: a clean 422 that
names the field), and the index enforces the ones it can run for any caller (filters.py,
keywords.py: FilterError), so the two can never disagree. Far above any real use, far below
what costs the server anything. (The longest query text is a setting, CONVIRT_MAX_TEXT_CHARS.)
"""

from __future__ import annotations

# results
K_DEFAULT = 10
K_MAX = 100  # results (groups, when grouped) one query returns
MAX_FETCH = 2_000  # hits one grouped query reads at most while it looks for k groups
MAX_GROUP_MEMBERS = 8  # images listed under a card; its `size` still counts them all
MAX_SENTENCES = 10  # sentences one report suggestion returns

# ids
ID_MAX = 2**63 - 1  # index ids are positive signed 64-bit integers
INT64 = (-(2**63), 2**63 - 1)  # what SQLite stores
MAX_FEEDBACK = 50  # liked or disliked images in one refine

# filters
MAX_FILTERS = 32  # fields one query filters on
MAX_FILTER_KEY_CHARS = 64
MAX_FILTER_VALUE_CHARS = 512
MAX_FILTER_CHOICES = 64  # values in one any-of list of a request
MAX_ANY_OF = 1000  # values in one any-of list the index runs (below SQLite's variable limit)
RANGE_BOUNDS = ("gte", "lte")  # a range filter: {"gte": low, "lte": high}, either left out
# the form or query-string `filters` (JSON text): room for MAX_FILTERS fields of the longest
# names and values (or short lists), and no more
MAX_FILTERS_JSON_CHARS = MAX_FILTERS * (MAX_FILTER_KEY_CHARS + 4 * MAX_FILTER_VALUE_CHARS + 8)

# keywords
MAX_KEYWORDS = 16  # terms of must and must_not together (the index); of each list (a request)
MAX_KEYWORD_CHARS = 200
