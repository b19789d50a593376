"""Training data of a folder written by ``convert_dataset.py``: labeled cases, and cases that have no
label at all.

``train.list`` names the labeled training cases in the order ``--labelnum`` takes them; the labeled set
is every slice of its first ``--labelnum`` cases. The unlabeled pool is every other training slice: the
rest of train.list (their labels are on disk but never used, as in the benchmarks) and every slice of the
cases in ``unlabeled.list``, whose h5 files hold no 'label' (``SliceCache`` reads only their image).
"""
import json
from pathlib import Path

from dataloaders.dataset import TrainData, check_class_counts, check_root, make_source, read_list

FORMAT = "sscd-converted-v1"


def read_dataset_info(root):
    """The dataset.json of a converted folder; ValueError naming it unless convert_dataset.py wrote it."""
    path = check_root(root) / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(f"--root_path {root}: no dataset.json; convert your data first: python "
                                f"code/dataloaders/convert_dataset.py --input <folder> --out {root}")
    try:
        info = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ValueError(f"{path}: not written by convert_dataset.py (expected format {FORMAT!r}); convert the "
                         f"data with code/dataloaders/convert_dataset.py")
    return info


def case_of_slice(slice_id):
    """'Case_07_slice_3' -> 'Case_07' (case names may hold underscores)."""
    return slice_id.rsplit("_slice_", 1)[0]


def optional_list(root, name):
    """Ids of ``root/name``, or [] when the file is absent or empty."""
    path = Path(root) / name
    return [line.strip() for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def labeled_cases(root, labelnum):
    """The first ``labelnum`` cases of train.list (all of them when ``labelnum`` is None)."""
    train = read_list(root, "train.list")
    if labelnum is None:
        return train
    if not 1 <= labelnum <= len(train):
        raise ValueError(f"--labelnum {labelnum}: expected 1..{len(train)} (labeled training cases in "
                         f"{Path(root) / 'train.list'})")
    return train[:labelnum]


class ConvertedTrainData(TrainData):
    """``TrainData`` of a converted folder: ``labeled`` / ``unlabeled`` index lists into ``cache``
    (labeled slices first); label-less slices carry the UNLABELED placeholder, never a file's label."""

    def __init__(self, root, labelnum, image_size, num_classes, data_cache="memory"):
        root = check_root(root)
        read_dataset_info(root)
        ids = read_list(root, "train_slices.list")
        chosen = set(labeled_cases(root, labelnum))
        labelless = set(optional_list(root, "unlabeled.list"))
        cases = [case_of_slice(s) for s in ids]  # once per slice: the pool can hold millions
        rows = {"labeled": [], "pool": []}
        for i, case in enumerate(cases):
            rows["labeled" if case in chosen else "pool"].append(i)
        order = rows["labeled"] + rows["pool"]  # positions in train_slices.list (the index's rows)
        self.labeled_case_ids = [c for c in read_list(root, "train.list") if c in chosen]
        self.cache, index = make_source(root, ids, image_size, num_classes, data_cache, order=order,
                                        unlabeled=[s for s, case in zip(ids, cases) if case in labelless])
        self.labeled = list(range(len(rows["labeled"])))
        self.unlabeled = list(range(len(rows["labeled"]), len(ids)))
        self.labelnum, self.list_path = labelnum, root / "train_slices.list"
        check_class_counts(index, num_classes, self.cache.ids, root, data_cache,
                           f"{root / 'dataset.json'}: class(es) {{absent}} occur in none of the labeled training "
                           f"slices; expected every class 0..{num_classes - 1} to occur")
        labeled = index.class_totals(self.labeled, num_classes)
        self.absent_in_labeled = [k for k in range(num_classes) if labeled[k] == 0]
