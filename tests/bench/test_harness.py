"""The benchmark harness (with a fake clock) and a quick ``streamdiff bench`` run on the tiny model."""

from __future__ import annotations

import json
import math

import pytest

from streamdiff.bench.harness import Case, Check, Comparison, format_table, report_dict, run_interleaved
from streamdiff.errors import ConfigError


class FakeClock:
    """A clock that only moves when a case says how long its work took."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def work(self, seconds: float):
        def step() -> None:
            self.now += seconds

        return step


def test_interleaved_rounds_alternate_order_and_skip_warmup_from_timing() -> None:
    clock = FakeClock()
    log: list[str] = []

    def step(name: str, seconds: float):
        def run() -> None:
            log.append(name)
            clock.now += seconds

        return run

    cases = [Case("a", step("a", 0.5)), Case("b", step("b", 0.25), items=2)]
    results = run_interleaved(cases, rounds=3, calls=2, warmup=1, clock=clock)
    # Warm-up a, b; then rounds a a b b | b b a a | a a b b.
    assert log == ["a", "b"] + ["a", "a", "b", "b"] + ["b", "b", "a", "a"] + ["a", "a", "b", "b"]
    a, b = results
    assert a.seconds == [0.5, 0.5, 0.5]
    assert b.seconds == [0.125, 0.125, 0.125]  # per item: 0.25 s per call of 2 items
    assert b.per_second == 8.0


def test_median_ignores_one_slow_round_and_setup_is_untimed() -> None:
    clock = FakeClock()
    durations = iter([1.0, 1.0, 9.0, 1.0, 1.0])
    setups: list[int] = []

    def step() -> None:
        clock.now += next(durations)

    def setup() -> None:
        setups.append(1)
        clock.now += 100.0  # untimed

    (result,) = run_interleaved([Case("x", step, setup=setup)], rounds=5, warmup=0, clock=clock)
    assert result.seconds == [1.0, 1.0, 9.0, 1.0, 1.0]
    assert result.median == 1.0
    assert len(setups) == 6  # once before warm-up, once per round


def test_per_case_warmup_override() -> None:
    clock = FakeClock()
    calls = {"slow": 0, "fast": 0}

    def counter(name: str):
        def run() -> None:
            calls[name] += 1

        return run

    run_interleaved(
        [Case("slow", counter("slow"), warmup=0), Case("fast", counter("fast"))], rounds=2, warmup=3, clock=clock
    )
    assert calls == {"slow": 2, "fast": 5}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rounds": 0}, "rounds=0"),
        ({"calls": 0}, "calls=0"),
        ({"warmup": -1}, "warmup=-1"),
    ],
)
def test_bad_arguments_name_the_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        run_interleaved([Case("a", lambda: None)], **kwargs)


def test_duplicate_or_missing_cases_are_rejected() -> None:
    with pytest.raises(ConfigError, match="not unique"):
        run_interleaved([Case("a", lambda: None), Case("a", lambda: None)])
    with pytest.raises(ConfigError, match="at least one"):
        run_interleaved([])


def test_comparison_ratios_checks_table_and_json() -> None:
    clock = FakeClock()
    cases = [Case("full", clock.work(2.0)), Case("self", clock.work(1.0)), Case("init", clock.work(1.5))]
    results = run_interleaved(cases, rounds=3, warmup=0, clock=clock)
    comparison = Comparison("rcfg", results, baseline="full", metrics={"self": {"unet_batch": 2.0}})
    comparison.checks.append(Check("self vs full frames/s", comparison.speedup("self"), 1.8))
    comparison.checks.append(Check("init vs full frames/s", comparison.speedup("init"), 1.8))
    assert comparison.speedup("self") == 2.0
    assert comparison.speedup("init", over="self") == pytest.approx(1.0 / 1.5)
    assert comparison.checks[0].met and not comparison.checks[1].met
    assert comparison.checks[1].shortfall == pytest.approx(1 - (2.0 / 1.5) / 1.8)
    table = format_table([comparison], title="demo")
    assert "[rcfg]" in table and "SHORT by 26%" in table and "unet_batch" in table
    comparison.metrics["full"] = {"psnr": math.inf}
    report = json.loads(json.dumps(report_dict([comparison], model="x"), allow_nan=False))
    assert report["comparisons"]["rcfg"]["cases"]["full"]["psnr"] is None
    assert report["model"] == "x"
    entry = report["comparisons"]["rcfg"]
    assert entry["baseline"] == "full"
    assert entry["cases"]["self"]["speedup_vs_baseline"] == 2.0
    assert entry["cases"]["self"]["unet_batch"] == 2.0
    assert entry["checks"][0] == {"what": "self vs full frames/s", "value": 2.0, "target": ">= 1.8", "met": True}
    with pytest.raises(ConfigError, match="baseline 'nope'"):
        Comparison("x", results, baseline="nope")


def test_check_lower_is_better_and_nan() -> None:
    assert Check("calls", 0.2, 0.5, higher_is_better=False).met
    assert not Check("calls", 0.7, 0.5, higher_is_better=False).met
    assert not Check("nan", math.nan, 1.0).met


def test_bench_quick_tiny_json(cache_dir, capsys) -> None:
    """A smoke run of the real command: every comparison is present, and the filter saves U-Net calls when static."""
    from streamdiff.cli import main

    code = main(["-q", "bench", "--model", "tiny", "--size", "128", "--quick", "--rounds", "3", "--no-compile", "--json"])
    assert code == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert "[tiny/rcfg]" in captured.err  # the human-readable table goes to stderr
    assert report["size"] == 128 and report["threads"] >= 1
    comparisons = report["comparisons"]
    assert sorted(comparisons) == sorted(
        f"tiny/{name}" for name in ("stream-batch", "rcfg", "filter", "dtype", "diffusers")
    )
    for comparison in comparisons.values():
        assert comparison["baseline"] in comparison["cases"]
        for case in comparison["cases"].values():
            assert len(case["rounds"]) >= 2
            assert case["seconds_per_item"] > 0 and case["items_per_second"] > 0
        for check in comparison["checks"]:
            assert set(check) == {"what", "value", "target", "met"}
    cases = comparisons["tiny/filter"]["cases"]
    assert cases["static"]["unet_calls_per_frame"] < cases["moving"]["unet_calls_per_frame"]
    assert cases["moving"]["skipped_fraction"] == 0.0
    rcfg = comparisons["tiny/rcfg"]["cases"]
    # U-Net rows per frame with n=2 steps: full CFG 2n, initialize n+1, self n.
    assert [rcfg[m]["unet_rows_per_frame"] for m in ("full", "initialize", "self")] == [4.0, 3.0, 2.0]
    batch = comparisons["tiny/stream-batch"]["cases"]
    assert batch["sequential"]["unet_calls_per_frame"] == 2.0 and batch["stream-batch"]["unet_calls_per_frame"] == 1.0
    diffusers = comparisons["tiny/diffusers"]["cases"]
    assert diffusers["diffusers-defaults"]["unet_calls_per_frame"] == 40.0  # 50 steps x strength 0.8
    assert diffusers["diffusers-same-steps"]["unet_calls_per_frame"] == 2.0
    dtype = comparisons["tiny/dtype"]["cases"]
    assert dtype["bfloat16"]["psnr_vs_float32_db"] > 20.0


def test_bench_rejects_bad_options(cache_dir) -> None:
    from streamdiff.cli import main

    assert main(["-q", "bench", "--size", "100"]) == 1
    assert main(["-q", "bench", "--threads", "0"]) == 1


def test_calibrated_tiny_vae_gives_unit_latents() -> None:
    import torch
    from diffusers import AutoencoderTiny

    from streamdiff.bench.suites import calibrate_tiny_vae

    torch.manual_seed(0)
    vae = AutoencoderTiny(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
                          num_encoder_blocks=(1,) * 4, num_decoder_blocks=(1,) * 4).eval()
    probe = torch.rand((1, 3, 64, 64)) * 2 - 1
    before = vae.encode(probe).latents.std().item()
    calibrate_tiny_vae(vae)
    with torch.no_grad():
        after = vae.encode(probe).latents.std().item()
    assert before < 0.5 and 0.5 < after < 2.0
