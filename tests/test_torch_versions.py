"""What differs between torch releases, answered the same way: the Inductor settings the library
compiles with, named as the installed torch names them (a torch that knows a tuning setting by
another name, or not at all, still compiles every rule), and whether a rule is being exported
(never under ``torch.compile``, which torch 2.11's Dynamo answered otherwise)."""

import logging

import torch

from compiledopt.export.rule import INDUCTOR_OPTIONS, inductor_configs
from compiledopt.transforms.base import is_exporting, is_vmapped

#: The setting names of an Inductor from before the CPU-specific realize thresholds (as torch
#: 2.11's ``torch._inductor.config`` has them), plus one dotted setting.
OLDER_INDUCTOR = frozenset(
    {"realize_opcount_threshold", "realize_acc_reads_threshold", "max_fusion_size", "cpp.threads"}
)


def test_the_installed_inductor_knows_every_setting_by_one_of_its_names():
    from torch._inductor import config

    known = config.get_config_copy()
    given = inductor_configs(INDUCTOR_OPTIONS)
    assert len(given) == len(INDUCTOR_OPTIONS) and set(given) <= set(known)
    assert sorted(given.values()) == sorted(INDUCTOR_OPTIONS.values())
    if "realize_cpu_opcount_threshold" in known:  # the pinned torch: the names as given
        assert given == INDUCTOR_OPTIONS


def test_an_older_inductor_gets_the_older_names():
    assert inductor_configs(INDUCTOR_OPTIONS, OLDER_INDUCTOR) == {
        "realize_opcount_threshold": 100_000,
        "realize_acc_reads_threshold": 100_000,
        "max_fusion_size": 100_000,
    }


def test_a_setting_it_does_not_know_is_left_out_with_a_log_line(caplog):
    options = {"max_fusion_size": 7, "cpp.threads": 2, "no_such_setting": 1}
    with caplog.at_level(logging.DEBUG, logger="compiledopt.export.rule"):
        assert inductor_configs(options, OLDER_INDUCTOR) == {"max_fusion_size": 7, "cpp.threads": 2}
    assert "'no_such_setting'" in caplog.text


def test_torch_compile_accepts_them():
    # torch.compile refuses an option its Inductor does not know ("Unexpected optimization
    # option"), before any tracing.
    compiled = torch.compile(lambda x: x * 2 + 1, options=inductor_configs(INDUCTOR_OPTIONS))
    torch.testing.assert_close(compiled(torch.arange(4.0)), torch.arange(4.0) * 2 + 1)


class _Probe(torch.nn.Module):
    def forward(self, x):
        return x + 1 if is_exporting() else x - 1


def test_is_exporting_only_under_torch_export():
    probe, x = _Probe(), torch.zeros(3)
    assert torch.equal(probe(x), x - 1)
    compiled = torch.compile(probe, fullgraph=True, dynamic=True)
    assert torch.equal(compiled(x), x - 1)  # torch 2.11's Dynamo took the export branch here
    program = torch.export.export(probe, (x,), strict=False)
    assert torch.equal(program.module()(x), x + 1)
    assert not is_exporting()


def test_is_vmapped_only_inside_vmap(monkeypatch):
    seen = []

    def probe(x):
        seen.append(is_vmapped(x))
        return x * 2

    x = torch.ones(3, 4)
    probe(x)
    torch.func.vmap(probe)(x)
    torch.func.grad(lambda v: probe(v).sum())(x)
    assert seen == [False, True, False]
    # A torch without the check: the unbatched answer, which every formulation computes right.
    monkeypatch.delattr(torch._C._functorch, "is_batchedtensor")
    torch.func.vmap(probe)(x)
    assert seen[-1] is False
