"""The node's web page: dashboard, study pages with the audit trail, upload of a study to grade,
sign-in, Prometheus ``/metrics`` and ``/healthz``, served by ``lumbar-node serve`` (Starlette on
uvicorn in a thread of its own; it reads and writes the ledger through the Ledger API, on a
connection of its own, and never holds up C-STORE)."""
