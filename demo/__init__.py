"""``lumbar-node demo``: the whole loop on one machine, outside the service package. A real Orthanc
(``orthanc``: the harness the demo and the tests use) plays the PACS, a phantom study is sent, the
node (``dicom_node.service.Node``) grades it and sends its results back (``run``). The command
(``cli``) joins ``lumbar-node`` through the ``lumbar_node.commands`` entry points, like ``phantom``.
Arrows: demo -> dicom_node, phantom, inference; nothing imports demo but the tests."""
