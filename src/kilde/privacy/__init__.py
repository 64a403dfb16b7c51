"""Privacy by design: consent, access, erasure, suppression, do-not-sell, retention, audit.

One module per concept: ledger (consent state), enforcement (the screen at collection and the
check at use), export (subject access), erasure, suppression, do_not_sell, retention, requests
(the request tracker), register (GDPR Art. 30) and audit. docs/privacy-and-compliance.md maps
each obligation to the feature and command that meets it.
"""
