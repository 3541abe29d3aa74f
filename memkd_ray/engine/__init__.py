"""Training and evaluation of MemKD for ONE category; no Ray, no storage.

    devices.py       device, precision, memory layout, compilation
    features.py      the frozen teacher's training features (cached or per step)
    optimization.py  one epoch: batches, exemplars, schedule, Eq. 11's step
    evaluation.py    anomaly maps, the five metrics, the normal-map calibration
    memory_recall.py the memories' value initialisation and their recall of unseen normals
    driver.py        `train_category`, the one epoch driver, and `fit` (in this process)
"""

from memkd_ray.engine.devices import (
    autocast,
    maybe_compile,
    place_model,
    resolve_device,
    resolve_precision,
    use_channels_last,
)
from memkd_ray.engine.driver import (
    ALREADY_FINISHED,
    FINISHED,
    STOPPED,
    EpochEnd,
    Scoring,
    Training,
    TrainState,
    Workers,
    fit,
    format_epoch,
    sync_student_batchnorm,
    train_category,
    training_inputs,
)
from memkd_ray.engine.evaluation import (
    Evaluation,
    calibrate_normal_map,
    evaluate,
    evaluate_dataset,
    image_loader,
    predict_maps,
)
from memkd_ray.engine.features import (
    TrainingFeatures,
    feature_cache_bytes,
    training_features,
    use_feature_cache,
)
from memkd_ray.engine.optimization import (
    LOSS_TERMS,
    MemKDObjective,
    epoch_batches,
    epoch_bound,
    make_optimizer,
    train_one_epoch,
    with_training_budget,
)

__all__ = [
    "ALREADY_FINISHED", "FINISHED", "LOSS_TERMS", "STOPPED", "EpochEnd", "Evaluation",
    "MemKDObjective", "Scoring", "TrainState", "Training", "TrainingFeatures", "Workers",
    "autocast", "calibrate_normal_map", "epoch_batches", "epoch_bound", "evaluate",
    "evaluate_dataset", "feature_cache_bytes", "fit", "format_epoch", "image_loader",
    "make_optimizer", "maybe_compile", "place_model", "predict_maps", "resolve_device",
    "resolve_precision", "sync_student_batchnorm", "train_category", "train_one_epoch",
    "training_features", "training_inputs", "use_channels_last", "use_feature_cache",
    "with_training_budget",
]
