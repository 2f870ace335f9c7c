"""``hf-spectralkd evaluate MODEL --dataset D``: the top-1/top-5 of any image classifier on a data set, with intervals.

The model runs as its own ``pipeline("image-classification")`` would run it: the pipeline loads the
model and its image processor, and each image goes through the pipeline's ``preprocess`` and
``forward``. The scores are taken by class index, not from the pipeline's label names, which repeat in
ImageNet's list ("crane" names two classes). evaluate 0.4.6's ``evaluator("image-classification")``
is not used: handed a pipeline under transformers 5 it stops in ``prepare_pipeline``
(``transformers`` has no ``TFPreTrainedModel`` any more), and it compares predictions with labels by
name only. The model's classes are matched to the data's by name (:func:`~hf_spectralkd.labels.match_labels`,
ImageNet synsets and descriptions included), and the scores go through the shipped ``accuracy_topk``
metric, with its 95 % bootstrap interval over the evaluation images.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigurationError

logger = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument("model", help="The classifier: a saved student folder, any local model folder or a Hub id.")
    parser.add_argument("--dataset", required=True,
                        help="A Hub dataset id, a local imagefolder, parquet or save_to_disk folder, or demo:mnist5k.")
    parser.add_argument("--split", default="validation", help="The split to score. Default: validation.")
    parser.add_argument("--image_column", default="image", help="Image column of the dataset. Default: image.")
    parser.add_argument("--label_column", default="label", help="Label column of the dataset. Default: label.")
    parser.add_argument("--max_eval_samples", type=int, default=None, help="Score only the first N images of the split.")
    parser.add_argument("--batch_size", type=int, default=32, help="Images per forward pass. Default: 32.")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu).")
    parser.add_argument("--revision", default=None, help="Model revision (branch, tag or commit) on the Hub.")
    parser.add_argument("--trust_remote_code", action="store_true", help="Allow model code from the Hub to run (off by default).")
    parser.add_argument("--output_file", default=None, help="Also write the scores to this JSON file.")
    parser.add_argument("--teacher", default=None,
                        help="Also run this classifier (e.g. the teacher) on the same images through its own pipeline, and "
                             "report top-1 agreement and mean KL(teacher ‖ model) (classes matched by name).")


def data_class_of_outputs(model_id2label: dict, data_id2label: dict[int, str]) -> np.ndarray:
    """For each model output, the data's class index (-1: a class the data lacks), matched by name.

    A model with default names (``LABEL_0``) is taken to be in the data's order when the counts agree.
    """
    from ..labels import class_names, match_labels, shown

    data_names = [data_id2label[i] for i in sorted(data_id2label)]
    model_names = class_names(model_id2label)
    if model_names is None:
        if len(model_id2label) != len(data_names):
            raise ConfigurationError(
                f"model: its {len(model_id2label)} classes have no names and the data has {len(data_names)}; "
                "score it on the data set it was trained for, or save it with config.id2label")
        logger.warning("the model's classes have no names: taken to be the data's %d classes in order", len(data_names))
        return np.arange(len(data_names))
    match = match_labels(data_names, model_names, "data", "model")
    if all(index is None for index in match.source_index):
        raise ConfigurationError(f"model: none of the data's classes ({shown(data_names)}) is among the model's "
                                 f"({shown(model_names)}); score it on a data set of its classes")
    if match.missing:
        logger.warning("the model has no output for %d of the data's classes (%s): their images count as wrong",
                       len(match.missing), shown(match.missing))
    to_data = np.full(len(model_names), -1, dtype=np.int64)
    for data_index, model_index in enumerate(match.source_index):
        if model_index is not None:
            to_data[model_index] = data_index
    return to_data


def _pipeline(model: str, options, argument: str):
    from transformers import pipeline

    from ..io.integrity import first_line

    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return pipeline("image-classification", model=model, device=device, revision=options.revision,
                        trust_remote_code=options.trust_remote_code)
    except (OSError, ValueError) as error:
        raise ConfigurationError(f"{argument}: cannot load '{model}' as an image classifier: {first_line(error)} "
                                 "(expected a local model folder or a Hub id; set HF_TOKEN for gated ones)") from error


def _logits(classifier, images) -> torch.Tensor:
    """``B×K`` logits of ``images`` as the pipeline computes them (its ``preprocess`` and ``forward``)."""
    inputs = [classifier.preprocess(image) for image in images]
    return classifier.forward({key: torch.cat([one[key] for one in inputs]) for key in inputs[0]})["logits"].float()


def run(options) -> int:
    import datasets
    from tqdm.auto import tqdm

    from ..data import DataArguments, decode_image, open_image_datasets
    from ..metrics import TOP_K, load_metric
    from ..teacher import teacher_label_order

    if options.batch_size <= 0:
        raise ConfigurationError(f"batch_size: must be positive, got {options.batch_size}")
    # The models before the data: a wrong id stops at once.
    classifier = _pipeline(options.model, options, "model")
    teacher = _pipeline(options.teacher, options, "teacher") if options.teacher else None
    # the teacher's logits in the model's class order (as in distillation; refuses label sets that differ)
    teacher_order = teacher_label_order(classifier.model, teacher.model) if teacher is not None else None
    agreement = load_metric("agreement") if teacher is not None else None
    data_args = DataArguments(dataset=options.dataset, eval_split=options.split, image_column=options.image_column,
                              label_column=options.label_column, max_eval_samples=options.max_eval_samples)
    raw = open_image_datasets(data_args, train=False)
    split = raw.eval.cast_column(options.image_column, datasets.Image(decode=False))
    to_data = data_class_of_outputs(classifier.model.config.id2label, raw.id2label)

    labels, top_k, skipped = [], [], 0
    bar = tqdm(total=len(split), desc=f"evaluating {Path(options.model).name}", unit="image")
    for start in range(0, len(split), options.batch_size):
        rows = split[start:start + options.batch_size]
        images = [decode_image(value) for value in rows[options.image_column]]
        kept = [(image, label) for image, label in zip(images, rows[options.label_column]) if image is not None]
        skipped += len(images) - len(kept)
        if kept:
            logits = _logits(classifier, [image for image, _ in kept])
            top_k.append(to_data[logits.topk(min(TOP_K, logits.shape[-1]), dim=-1).indices.cpu().numpy()])
            labels += [label for _, label in kept]
            if teacher is not None:
                teacher_logits = _logits(teacher, [image for image, _ in kept])
                if teacher_order is not None:
                    teacher_logits = teacher_logits[:, teacher_order.to(teacher_logits.device)]
                agreement.add_batch(predictions=logits.cpu().numpy(), references=teacher_logits.cpu().numpy())
        bar.update(len(images))
    bar.close()
    if not labels:
        raise ConfigurationError(f"dataset: no decodable image in split '{options.split}' of '{options.dataset}'")
    scores = load_metric("accuracy_topk").compute(predictions=np.concatenate(top_k), references=np.asarray(labels))
    if agreement is not None:
        scores.update(agreement.compute())
    report = {"model": options.model, "dataset": options.dataset, "split": raw.eval_split, "images": len(labels),
              "skipped_images": skipped, **{f"eval_{name}": value for name, value in scores.items()}}
    for name in ("top1", "top5"):
        if name in scores:
            print(f"{name}: {100 * scores[name]:.2f} % (95 % CI {100 * scores[f'{name}_ci_low']:.2f}–"
                  f"{100 * scores[f'{name}_ci_high']:.2f} %)")
    if agreement is not None:
        print(f"agreement with {options.teacher}: {100 * scores['agreement']:.2f} % of top-1 predictions, "
              f"mean KL(teacher ‖ model) {scores['kl']:.4f} nats")
    print(f"on {len(labels):,} images of {options.dataset} [{raw.eval_split}]"
          + (f"; {skipped:,} could not be decoded and are not counted" if skipped else ""))
    if options.output_file:
        Path(options.output_file).parent.mkdir(parents=True, exist_ok=True)
        Path(options.output_file).write_text(json.dumps(report, indent=2))
        print(f"wrote {options.output_file}")
    return 0
