"""Oracle and StS DSC on every 8th val slice, as trained and with BatchNorm statistics recomputed.

    .venv/bin/python docs/runs/finetune_choices/bn_recal.py MODEL TRAIN_FOLDER ../shared/data/ct_segthor_aorta
"""

import json
import sys

import numpy as np
import torch

from napari_segthenseg.engine import Engine, load_model
from napari_segthenseg.engine.boxes import boxes_from_mask
from trainer.augment import augment_batch
from trainer.data import load_samples, load_stems
from trainer.gtcrops import FineData, RoughData, prepare
from trainer.metrics import scores

torch.set_num_threads(1)
m = load_model(sys.argv[1])
s = m.settings
samples = load_samples(sys.argv[2], None)
items = [prepare(x, s.size, s.in_channels, s.normalisation, s.min_box) for x in samples]
with open(f"{sys.argv[3]}/splits.json") as fh:
    val = json.load(fh)["val"][::8]
vs = load_stems(sys.argv[3], val)


def oracle(model):
    e = Engine(model, "cpu")
    d, dd = [], []
    for x in vs:
        b = boxes_from_mask(x.mask, x.mask.shape, s.pad, s.min_box)
        d.append(scores(e.segment(x.image, boxes=b).mask, x.mask)["dsc"])
        dd.append(scores(e.segment(x.image).mask, x.mask)["dsc"])
    return round(float(np.mean(d)), 3), round(float(np.mean(dd)), 3)


def recal(net, data, aug):
    for mod in net.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None
    net.train()
    torch.manual_seed(0)
    with torch.no_grad():
        for _ in range(20):
            idx = torch.randint(len(data), (16,))
            xs, ys = zip(*[data[int(i)] for i in idx], strict=True)
            x, y = torch.stack(xs), torch.stack(ys)
            if aug:
                x, y = augment_batch(x, y)
            net(x)
    net.eval()


print("as trained: oracle, sts", oracle(m), flush=True)
for aug in (False, True):
    m2 = load_model(sys.argv[1])
    recal(m2.fine, FineData(items, s.size, s.in_channels, s.pad), aug)
    recal(m2.rough, RoughData(items), aug)
    print("recalibrated, aug", aug, oracle(m2), flush=True)
