"""Preference data: read any source, normalise and validate rows, tokenise, stream with Ray Data.

- :mod:`raypo.data.records`: the normalised records (``Source``, ``PreferencePair``,
  ``Rejection``) and the rejection reason codes.
- :mod:`raypo.data.readers`: which sources a config names, and streaming one source's rows.
- :mod:`raypo.data.formats`: one raw row -> a ``PreferencePair`` (pairs, raw HH dialogues,
  chat message lists) or a ``Rejection``.
- :mod:`raypo.data.validate`: text-level checks and the ``DataSummary`` of what was kept.
- :mod:`raypo.data.tokenize`, :mod:`raypo.data.collate`: token ids, truncation, batches.
- :mod:`raypo.data.pipeline`, :mod:`raypo.data.reference`, :mod:`raypo.data.prepare`: the Ray
  Data job, the reference pass and ``raypo prepare``.
"""
