"""Fine and rough net on fixed ground-truth crops of the training images, eval vs train mode.

    .venv/bin/python docs/runs/finetune_choices/bn_check.py MODEL TRAIN_FOLDER
"""

import sys

import torch

from napari_segthenseg.engine import load_model
from trainer.data import load_samples
from trainer.gtcrops import fixed_crops, prepare
from trainer.losses import dice_per_item, soft_dice_loss

torch.set_num_threads(1)
m = load_model(sys.argv[1])
s = m.settings
samples = load_samples(sys.argv[2], None)
items = [prepare(x, s.size, s.in_channels, s.normalisation, s.min_box) for x in samples]
x, y = fixed_crops(items, s.size, s.in_channels, s.pad, s.min_box, 8, 2022)
print("crops", x.shape, "x range", float(x.min()), float(x.max()), "fg frac", float(y.mean()))
for name, net in (("fine", m.fine), ("rough", m.rough)):
    for mode in ("eval", "train"):
        net.train(mode == "train")
        with torch.no_grad():
            lg = net(x)
        print(name, mode, "loss", round(float(soft_dice_loss(lg, y)), 3),
              "dice", round(float(dice_per_item(lg >= 0, y >= 0.5).mean()), 3),
              "pred fg", round(float((lg >= 0).float().mean()), 3))
