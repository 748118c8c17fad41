"""Training code for the ICH classifier (``triage-node train`` / ``evaluate``).

Modules, each importing only preprocess, model, domain, errors, logs, spool and store from
:mod:`triage_node` - never the SCP, the queue or the API:

:mod:`train.data`
    Labels (RSNA ``stage_2_train.csv`` or a generic CSV), the cached DICOM header index,
    the patient-level multilabel-stratified split and the persistent slice cache.
:mod:`train.feedback`
    Labels the node collects itself (``--from-store``): the radiologists' verdicts in its
    database, as strong negative slices (refuted series) and series-level bags (confirmed).
:mod:`train.metrics`
    The RSNA weighted log loss, ROC AUC, confusion counts, thresholds for a sensitivity.
:mod:`train.loop`
    The training run: epochs, checkpoints, resume, early stopping, the artifact, and the
    multiple-instance loss of the bags (the maximum over a series' slices).
:mod:`train.evaluate`
    Figures, plots and the HTML report for an artifact on labelled data.
"""
