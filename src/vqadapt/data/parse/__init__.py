"""One parser per annotation format, each run under one of two policies.

``vivqa_csv``, ``vqa_json`` and ``jsonl`` each turn a file's text into records and report
what is wrong to a :class:`~vqadapt.data.parse.problems.Collector`. The loaders
(:mod:`vqadapt.data.formats`) use a collector that raises the first error as
:class:`~vqadapt.errors.VQADataError`; the data check (:mod:`vqadapt.data.check`) uses one
that keeps every problem, so a user fixes a file in one pass. Same code, so a file the check
passes loads to exactly the records it saw, and a loader's error is the first one the check
lists. Shared field rules (text, answers, ids, Unicode, reading bytes) are in ``fields``.
"""
