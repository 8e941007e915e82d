"""``raypo tune``: Ray Tune sweeps of raypo training runs (:mod:`raypo.tune.run`), the search-space
syntax and trial configs (:mod:`raypo.tune.space`) and what a sweep leaves for the user
(:mod:`raypo.tune.results`)."""
