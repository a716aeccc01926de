"""Mutating admission webhook: annotation-driven injection of the dda sidecar into pods.

`mutate.py` is pure (AdmissionReview dict in, AdmissionReview dict out); `app.py` serves it
over HTTPS (`dda webhook`)."""
