"""Lumbar spine MRI AI DICOM node: the service and its command line.

The data's path through the rooms:

    C-STORE / upload -> ingest (admission) -> store (spool, ledger) -> pipeline (release -> worker)
        -> results -> pipeline (delivery) -> dicom (SCU)

Rooms (subpackages; each ``__init__`` says what it is for and exports its public names):

- ``observability``: logging, patient-data scrubbing, metrics;
- ``store``: what must survive a crash (ledger, spool layout, durable writes, paths under a root);
- ``ingest``: admission of an instance, whatever brought it (the header checks);
- ``dicom``: DIMSE bytes in and out (storage SCP, peers, pynetdicom tuning, statuses, SCU);
- ``pipeline``: what happens to a stored study (release, worker, eligibility, delivery, retention);
- ``results``: what a run produces (writer, SR, SC, PDF, text, source modules, identity);
- ``web``: the web page (server, app, routes, accounts, security, views, uploads).

Shared vocabulary at the top (every room may import it): ``config``, ``states``, ``errors``
(``NodeError``), ``tls``. ``service`` is the composition root (``Node``); ``cli`` the
``lumbar-node`` command; ``predict`` the ``predict`` command's engine. The demo lives outside,
in the ``demo`` package.
"""

from inference import __version__

__all__ = ["__version__"]
