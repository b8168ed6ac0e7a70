"""The training and evaluation programs (`convirt train`, `convirt eval`)."""
