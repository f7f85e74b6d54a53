"""Certified defenses against data poisoning: randomized smoothing (Hong et al.), RAB (Weber et al.) and
DPA (Levine & Feizi), and their loop."""

from lightning_defense.certify.dpa import (
    certified_modified_samples,
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
    RabCertificate,
    RabCertificateBatch,
    certified_accuracy,
    certify,
    certify_batch,
    certify_rab,
    certify_rab_batch,
    linf_to_l2,
    lower_confidence_bound,
    per_sample_radius,
    plot_certified_accuracy,
    predict,
    two_class_radius,
    upper_confidence_bound,
)
from lightning_defense.certify.training import build_model, rab_test_noise, train_and_vote
from lightning_defense.certify.votes import VoteStore

__all__ = [
    "ABSTAIN",
    "DEFAULT_SMOOTHING",
    "Certificate",
    "CertificateBatch",
    "CertificationResult",
    "RabCertificate",
    "RabCertificateBatch",
    "TrainingOptions",
    "VoteStore",
    "build_model",
    "certified_accuracy",
    "certified_modified_samples",
    "certify",
    "certify_batch",
    "certify_rab",
    "certify_rab_batch",
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
    "rab_test_noise",
    "run_certification",
    "train_and_vote",
    "two_class_radius",
    "upper_confidence_bound",
]
