"""Certified defenses against data poisoning: randomized smoothing (Hong et al.) and DPA, and their loop."""

from lightning_defense.certify.dpa import (
    dpa_certificate,
    dpa_certificate_batch,
    dpa_partition,
    median_certified_size,
)
from lightning_defense.certify.loop import (
    DEFAULT_SMOOTHING,
    CertificationResult,
    TrainingOptions,
    plot_runs,
    run_certification,
)
from lightning_defense.certify.smoothing import (
    ABSTAIN,
    Certificate,
    CertificateBatch,
    certified_accuracy,
    certify,
    certify_batch,
    linf_to_l2,
    lower_confidence_bound,
    per_sample_radius,
    plot_certified_accuracy,
    predict,
    two_class_radius,
)
from lightning_defense.certify.training import build_model, train_and_vote
from lightning_defense.certify.votes import VoteStore

__all__ = [
    "ABSTAIN",
    "DEFAULT_SMOOTHING",
    "Certificate",
    "CertificateBatch",
    "CertificationResult",
    "TrainingOptions",
    "VoteStore",
    "build_model",
    "certified_accuracy",
    "certify",
    "certify_batch",
    "dpa_certificate",
    "dpa_certificate_batch",
    "dpa_partition",
    "linf_to_l2",
    "lower_confidence_bound",
    "median_certified_size",
    "per_sample_radius",
    "plot_certified_accuracy",
    "plot_runs",
    "predict",
    "run_certification",
    "train_and_vote",
    "two_class_radius",
]
