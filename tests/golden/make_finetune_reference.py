"""Regenerate the golden fine-tuning / linear-probing recipe values from the official code.

    git clone https://github.com/facebookresearch/mae /tmp/mae_official
    python tests/golden/make_finetune_reference.py --official /tmp/mae_official

Imports the official `models_vit.py`, `util/lr_decay.py` and `util/lars.py` and runs them on
timm 1.x. None of the three needs a patch there (they do not touch `qk_scale` or `np.float`; the
`np.float` alias is still restored, as in make_reference.py, in case an official module pulls in
`util/pos_embed.py`). Writes:
- `finetune_reference.json`: for ViT-B/16 (layer_decay 0.65), ViT-L/16 (0.75) and ViT-H/14 (0.75),
  built as main_finetune.py does (global_pool=True, num_classes=1000, drop_path 0.1/0.2/0.3 as in
  FINETUNE.md), the parameter groups of the official `lr_decay.param_groups_lrd(model, 0.05,
  no_weight_decay_list=model.no_weight_decay(), layer_decay=...)`, in order, each as
  {"name", "lr_scale", "weight_decay", "params": [parameter names]}; and, under "linprobe", the
  state-dict keys/shapes and trainable parameters of main_linprobe.py's ViT-B/16 (cls token) after
  its BatchNorm head and freezing;
- `lars_reference.pt`: a linear-probe head's initial state, four gradient sets and the official
  LARS parameters and momentum buffers after each step, for three cases.

timm 1.x vs the official timm 0.3.2: timm 1.x's VisionTransformer already has an `fc_norm` slot
(before `head`), which models_vit.py fills, whereas on timm 0.3.2 the official code appends
`fc_norm` after `head`. Only the last layer's two groups differ: on timm 1.x "layer_{L}_no_decay"
(fc_norm.weight, fc_norm.bias, head.bias) comes before "layer_{L}_decay" (head.weight); on 0.3.2 it
is the other way round and the no-decay group reads head.bias, fc_norm.weight, fc_norm.bias.
"groups" is what runs here (timm 1.x); "groups_timm_0_3_2" is the same official function run on
the same model with `fc_norm` moved to the end of the children, which reproduces the 0.3.2
registration order (checked once against a real timm 0.3.2 install).
"""
import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).parent

# (model, layer_decay, drop_path) from FINETUNE.md's ViT-B / ViT-L / ViT-H commands
FINETUNE = (("vit_base_patch16", 0.65, 0.1), ("vit_large_patch16", 0.75, 0.2),
            ("vit_huge_patch14", 0.75, 0.3))
WEIGHT_DECAY = 0.05  # FINETUNE.md --weight_decay 0.05 (also main_finetune.py's default)


def load_official(repo: Path):
    np.float = np.float64  # removed from numpy >= 1.24; used by util/pos_embed.py
    sys.path.insert(0, str(repo))
    import models_vit
    import util.lars as lars
    import util.lr_decay as lr_decay
    return models_vit, lr_decay, lars


def official_groups(lr_decay, model, layer_decay):
    """Run the official param_groups_lrd and return its groups with parameter names and group names.

    The official function returns only `list(param_groups.values())` (parameter objects, no group
    names); it builds a twin dict `param_group_names` keyed by the group name ("layer_3_decay"),
    with the same keys in the same insertion order, and only prints it in a comment. Nothing is
    patched: a profile hook reads that local dict when the function returns, and the groups are
    also named independently by mapping each returned parameter object back to its name through
    model.named_parameters() (identity); the two must agree.
    """
    captured = {}
    code = lr_decay.param_groups_lrd.__code__

    def hook(frame, event, arg):
        if event == "return" and frame.f_code is code:
            captured.update(copy.deepcopy(frame.f_locals["param_group_names"]))

    sys.setprofile(hook)
    try:
        groups = lr_decay.param_groups_lrd(model, WEIGHT_DECAY,
                                           no_weight_decay_list=model.no_weight_decay(),
                                           layer_decay=layer_decay)
    finally:
        sys.setprofile(None)
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    assert len(captured) == len(groups)
    for gname, g in zip(captured, groups):
        params = [names[id(p)] for p in g["params"]]
        ref = captured[gname]
        assert params == ref["params"], gname
        assert (g["lr_scale"], g["weight_decay"]) == (ref["lr_scale"], ref["weight_decay"]), gname
        out.append({"name": gname, "lr_scale": float(g["lr_scale"]),
                    "weight_decay": float(g["weight_decay"]), "params": params})
    # every trainable parameter lands in exactly one group
    assert sorted(p for g in out for p in g["params"]) == sorted(
        n for n, p in model.named_parameters() if p.requires_grad)
    return out


def finetune_reference(models_vit, lr_decay, commit):
    golden = {"_about": {
        "official_commit": commit, "weight_decay": WEIGHT_DECAY,
        "call": "lr_decay.param_groups_lrd(model, 0.05, no_weight_decay_list="
                "model.no_weight_decay(), layer_decay=layer_decay)",
        "groups": "order as produced on timm 1.x (fc_norm registered before head)",
        "groups_timm_0_3_2": "order on the official timm 0.3.2 (fc_norm registered after head)",
    }}
    for name, layer_decay, drop_path in FINETUNE:
        with torch.device("meta"):
            model = getattr(models_vit, name)(num_classes=1000, drop_path_rate=drop_path,
                                              global_pool=True)
        entry = {"layer_decay": layer_decay, "drop_path_rate": drop_path, "global_pool": True,
                 "num_classes": 1000, "num_layers": len(model.blocks) + 1,
                 "no_weight_decay": sorted(model.no_weight_decay()),
                 "groups": official_groups(lr_decay, model, layer_decay)}
        fc_norm = model._modules.pop("fc_norm")  # re-register last, as on timm 0.3.2
        model._modules["fc_norm"] = fc_norm
        entry["groups_timm_0_3_2"] = official_groups(lr_decay, model, layer_decay)
        golden[name] = entry

    # main_linprobe.py: model built with global_pool=False (its default, FINETUNE.md --cls_token)
    # and no drop_path; then these lines of its main(), copied verbatim:
    with torch.device("meta"):
        model = models_vit.vit_base_patch16(num_classes=1000, global_pool=False)
        model.head = torch.nn.Sequential(
            torch.nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6), model.head)
    for _, p in model.named_parameters():
        p.requires_grad = False
    for _, p in model.head.named_parameters():
        p.requires_grad = True
    golden["linprobe"] = {
        "model": "vit_base_patch16", "global_pool": False, "num_classes": 1000,
        "state_dict": [[k, list(v.shape)] for k, v in model.state_dict().items()],
        "requires_grad": [n for n, p in model.named_parameters() if p.requires_grad],
        "frozen": [n for n, p in model.named_parameters() if not p.requires_grad],
        "head_bn": {"affine": False, "eps": 1e-6, "momentum": 0.1, "track_running_stats": True},
    }
    return golden


def lars_reference(lars):
    from timm.layers import trunc_normal_  # timm 0.3.2: timm.models.layers.trunc_normal_

    torch.manual_seed(0)
    head = nn.Sequential(nn.BatchNorm1d(64, affine=False, eps=1e-6), nn.Linear(64, 10))
    trunc_normal_(head[1].weight, std=0.01)  # main_linprobe.py: following MoCo v3
    with torch.no_grad():
        head[1].bias.copy_(0.01 * torch.randn(10))  # nonzero, so the bias moves visibly
    state = {k: v.clone() for k, v in head.state_dict().items()}
    names = [n for n, _ in head.named_parameters()]  # ["1.weight", "1.bias"]

    gen = torch.Generator().manual_seed(1)
    grads = []
    for step in range(4):
        grads.append({"1.weight": 0.05 * torch.randn(10, 64, generator=gen),
                      "1.bias": 0.05 * torch.randn(10, generator=gen)})
    grads[1]["1.bias"] = torch.zeros(10)  # 1-D: momentum only
    grads[2]["1.weight"] = torch.zeros(10, 64)  # update_norm == 0 branch (when weight_decay == 0)

    init = {n: state[n] for n in names}
    zero_w = {"1.weight": torch.zeros(10, 64), "1.bias": state["1.bias"].clone()}
    cases = [("wd0", 0.0, init), ("wd1e-4", 1e-4, init),
             ("wd1e-4_zero_init_weight", 1e-4, zero_w)]  # param_norm == 0 branch on step 0
    golden = {"state_dict": state, "param_names": names, "grads": grads, "cases": [],
              "about": "official util/lars.py LARS(head.parameters(), lr=lr, weight_decay=wd) "
                       "with default momentum/trust_coefficient, as main_linprobe.py; per step: "
                       "p.grad = grads[i][name]; optimizer.step()"}
    for cname, wd, start in cases:
        with torch.no_grad():
            for n, p in head.named_parameters():
                p.copy_(start[n])
        opt = lars.LARS(head.parameters(), lr=0.3, weight_decay=wd)
        steps = []
        for g in grads:
            for n, p in head.named_parameters():
                p.grad = g[n].clone()
            opt.step()
            steps.append({"params": {n: p.detach().clone() for n, p in head.named_parameters()},
                          "mu": {n: opt.state[p]["mu"].clone() for n, p in head.named_parameters()}})
        group = opt.param_groups[0]
        golden["cases"].append({"name": cname, "lr": 0.3, "weight_decay": wd,
                                "momentum": float(group["momentum"]),
                                "trust_coefficient": float(group["trust_coefficient"]),
                                "init_params": {n: v.clone() for n, v in start.items()},
                                "steps": steps})
    return golden


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--official", type=Path, required=True, help="checkout of facebookresearch/mae")
    args = ap.parse_args()
    models_vit, lr_decay, lars = load_official(args.official)
    try:
        commit = subprocess.run(["git", "-C", str(args.official), "rev-parse", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None

    golden = finetune_reference(models_vit, lr_decay, commit)
    (HERE / "finetune_reference.json").write_text(json.dumps(golden, indent=1))
    torch.save(lars_reference(lars), HERE / "lars_reference.pt")
    print(f"wrote {HERE / 'finetune_reference.json'} and {HERE / 'lars_reference.pt'}")


if __name__ == "__main__":
    main()
