"""Evaluation: metrics on frozen embeddings (``metrics``), the featurizers compared (``featurizers``,
``baselines``, ``dual``), the harness that runs every protocol (``harness``) and the HTML report
(``report``)."""
