"""Main-job demo: audit + leakage-free split + cache + a short hierarchical training run.

    python pipelines/demo_train.py pipelines/brain_tumor_demo.yaml

Writes ``runs/<name>/`` with the audit report, the split file and ``metrics.json``.  This
is a stand-in until ``kmedtl run`` (the end-to-end pipeline) exists.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--epochs", type=int)
    args = ap.parse_args(argv)

    import keras
    import numpy as np
    from sklearn.metrics import balanced_accuracy_score, cohen_kappa_score

    from kmedtl.config import load_config
    from kmedtl.data.audit import format_summary, public
    from kmedtl.data.pipeline import make_dataset
    from kmedtl.data.prepare import prepare
    from kmedtl.models import HierarchicalClassifier, backbone

    t0 = time.time()
    cfg = load_config(args.config)
    run_dir = os.path.join(cfg.output_dir, cfg.name)
    os.makedirs(run_dir, exist_ok=True)
    prep = prepare(cfg)
    print(format_summary(prep.report))
    with open(os.path.join(run_dir, "audit.json"), "w") as fh:
        json.dump(public(prep.report), fh, indent=1)
    prep.splits.save(os.path.join(run_dir, "splits.json"), root=prep.index.root)
    train, val, test = (prep.samples(p) for p in ("train", "val", "test"))
    print(f"split: train {len(train)}, val {len(val)}, test {len(test)}, dropped "
          f"{len(prep.splits.dropped)} training images that duplicate a test image")

    tcfg = cfg.train
    keras.utils.set_random_seed(cfg.split.seed)
    h, opts = prep.hierarchy, prep.options
    kw = dict(hierarchy=h, options=opts, cache=prep.cache, targets="hierarchy",
              batch_size=int(tcfg.get("batch_size", 32)))
    ds_train = make_dataset(train, training=True, augment=cfg.augmentation(seed=0), **kw)
    ds_val = make_dataset(val, **kw)
    ds_test = make_dataset(test, **kw)
    model = HierarchicalClassifier(
        backbone=backbone(tcfg.get("backbone", "cbr_small"), input_shape=opts.shape),
        hierarchy=h, dropout=0.2)
    model.compile(optimizer=keras.optimizers.Adam(float(tcfg.get("learning_rate", 3e-3))))
    epochs = args.epochs or int(tcfg.get("epochs", 5))
    model.fit(ds_train, validation_data=ds_val, epochs=epochs, verbose=2)

    probs = model.predict(ds_test, verbose=0)["leaf"]
    y_true = np.concatenate([y["leaf"].numpy() for _, y in ds_test])
    y_pred = probs.argmax(1)
    metrics = {
        "test_images": int(len(y_true)),
        "leaf_accuracy": float((y_pred == y_true).mean()),
        "leaf_balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "leaf_kappa": float(cohen_kappa_score(y_true, y_pred)),
        "epochs": epochs,
        "seconds": round(time.time() - t0, 1),
    }
    with open(os.path.join(run_dir, "metrics.json"), "w") as fh:
        json.dump(metrics, fh, indent=1)
    print(json.dumps(metrics, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
