"""Figures quoted in README.md and BENCHMARKS.md agree with the committed result files
(benchmarks/figures.py reads them), and BENCHMARKS.md opens with the generated headline table."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import figures  # noqa: E402


def prose(path: Path) -> str:
    """The file with its line breaks and runs of spaces folded, so a figure may wrap across lines."""
    return re.sub(r"\s+", " ", path.read_text())


def test_benchmarks_opens_with_the_generated_headline_table() -> None:
    text = (REPO / "BENCHMARKS.md").read_text()
    assert figures.current_block(text) == figures.block(), "stale: run python benchmarks/figures.py"
    assert text.index(figures.BEGIN) < text.index("\n## 1. ")  # before the first section


def test_the_language_model_tables_are_generated_from_the_results() -> None:
    text = (REPO / "BENCHMARKS.md").read_text()
    assert figures.current_block(text, figures.LLM_BEGIN, figures.LLM_END) == figures.llm_block(), \
        "stale: run python benchmarks/figures.py"


def test_every_link_of_the_table_names_a_section() -> None:
    text = (REPO / "BENCHMARKS.md").read_text()
    anchors = {figures.slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}
    links = re.findall(r"\]\(#([^)]+)\)", figures.table())
    assert len(links) == 10 and not set(links) - anchors, set(links) - anchors


def test_readme_quotes_the_default_policy_figures() -> None:
    f = figures.figures()
    text = prose(REPO / "README.md")
    assert (f"at δ 0.9, {100 * f.early_share:.0f} % leave at exit 0 or 1 and {100 * f.coverage:.1f} % come back with "
            f"`target_met: true`, {100 * f.promised:.1f} % of those correct") in text
    assert (f"answers δ 0.9 at {100 * f.deep_accuracy:.1f} % test accuracy for {f.deep_mflops:.1f} MFLOPs a sample, "
            f"where the default bundle needs {f.mflops:.1f} MFLOPs for {100 * f.accuracy:.1f} %") in text
    assert (f"({100 * f.deep_accuracy_05:.0f} % accuracy, {f.deep_mflops_05:.1f} MFLOPs, against "
            f"{100 * f.accuracy_05:.0f} % for {f.mflops_05:.0f} MFLOPs)") in text
    assert f"({f.plain_mflops:.1f} of the default bundle's {f.full_mflops:.1f} MFLOPs)" in text
    assert f"`DEFAULT_POLICY` | 0.9, {f.default_policy}" in text


def test_readme_grey_image_prose_matches_the_answer_it_shows() -> None:
    text = (REPO / "README.md").read_text()
    [answer] = re.findall(r"```json\n(.*?)```", text, re.DOTALL)[:1]
    estimate = json.loads(answer.replace("…", ""))["predictions"][0]["estimated_accuracy"]
    assert f"even the last one estimates only {estimate:.2f} " in prose(REPO / "README.md")


def test_benchmarks_quotes_the_last_exit_accuracy() -> None:
    f = figures.figures()
    assert f"**Last exit: {100 * f.last_exit_accuracy:.2f} % test accuracy**" in prose(REPO / "BENCHMARKS.md")


def test_the_cascade_headline_is_generated_and_its_prose_matches_the_results() -> None:
    text = (REPO / "BENCHMARKS.md").read_text()
    assert figures.current_block(text, figures.CASCADE_BEGIN, figures.CASCADE_END) == figures.cascade_block(), \
        "stale: run python benchmarks/figures.py"
    result = json.loads((figures.RESULTS / figures.CASCADE_RESULT).read_text())
    wall = json.loads((figures.RESULTS / figures.CASCADE_WALLCLOCK).read_text())
    summary = result["summary"]
    section = prose(REPO / "BENCHMARKS.md").split("### 4.5 ")[1].split("\n## ")[0]
    at_w64 = {policy: summary[policy]["cifar10-cascade-w64"]["ratio_mean"] for policy in ("pcee", "confidence", "pcee-lb-tail")}
    last_exit = 1 - result["splits"][0]["large"]["exits"][-1]["error"]
    assert (f"the best is {at_w64['pcee']:.3f} (`pcee`) and {at_w64['confidence']:.3f} (`confidence`)" in section
            and f"{at_w64['pcee-lb-tail']:.3f} under the default" in section)
    assert f"**missed**, {100 * last_exit:.1f} %" in section
    assert f"**missed**, {wall['ratio_median']:.2f}×: at δ {wall['delta']:.2f}" in section
    assert f"({wall['match']['large_mflops']:.0f} against {wall['match']['small_mflops']:.0f} MFLOPs)" in section
    assert not any(s["goal_met"] for p in summary.values() for s in p.values())  # the prose says missed


def test_the_four_exit_cascade_figures_match_their_result() -> None:
    result = json.loads((figures.RESULTS / "headline-cascade-large4" / "headline.json").read_text())
    at_w64 = {p: result["summary"][p]["cifar10-cascade-w64"]["ratio_mean"] for p in ("pcee", "confidence", "pcee-lb-tail")}
    new_exit = result["splits"][0]["large"]["exits"][2]
    section = prose(REPO / "BENCHMARKS.md").split("### 4.5 ")[1].split("\n## ")[0]
    assert (f"ratio {at_w64['pcee']:.3f} (`pcee`) and {at_w64['confidence']:.3f} (`confidence`) at `cascade-w64`'s cost, "
            f"{at_w64['pcee-lb-tail']:.3f} under `pcee-lb-tail`") in section
    assert f"({100 * new_exit['error']:.2f} % at {new_exit['mflops']:.0f} MFLOPs)" in section


def test_the_distilled_cascade_figures_match_their_result() -> None:
    result = json.loads((figures.RESULTS / "headline-cascade-sd" / "headline.json").read_text())
    summary = result["summary"]
    exits = result["splits"][0]["large"]["exits"]
    section = prose(REPO / "BENCHMARKS.md").split("### 4.5 ")[1].split("\n## ")[0]
    pcee = summary["pcee"]["cifar10-cascade-w64"]
    lb_tail = summary["pcee-lb-tail"]["cifar10-cascade-w64"]
    assert (f"{100 * exits[0]['error']:.2f} % at 12 MFLOPs and {100 * exits[1]['error']:.2f} % at 50" in section
            and f"last exit {100 * exits[2]['error']:.2f} %" in section)
    assert (f"ratio a little: {pcee['ratio_mean']:.3f} (`pcee`, {pcee['ratio_min']:.3f}–{pcee['ratio_max']:.3f} over "
            f"the splits) and {summary['confidence']['cifar10-cascade-w64']['ratio_mean']:.3f} (`confidence`)") in section
    assert (f"{summary['pcee']['cifar10-cascade-w48']['ratio_mean']:.3f} at `cascade-w48`'s, "
            f"{summary['pcee']['cifar10-cascade-w32']['ratio_mean']:.3f} at `cascade-w32`'s") in section
    assert f"`pcee-lb-tail` {lb_tail['ratio_mean']:.3f} ({lb_tail['ratio_min']:.3f}–{lb_tail['ratio_max']:.3f})" in section
    best = min(summary[p]["cifar10-cascade-w64"]["ratio_mean"] for p in ("pcee", "confidence", "pcee-lb-tail"))
    assert f"**missed, by {best - 0.81:.3f}** at best" in section  # the goal: a ratio of 0.81


def test_the_language_model_speed_prose_matches_its_result() -> None:
    """The figures BENCHMARKS quotes about fused segments and the peers come from the run before lookup
    drafts (llm-precision-before-lookup.json)."""
    result = json.loads((figures.RESULTS / "llm-precision-before-lookup.json").read_text())
    one, peer = result["one_stream"], result["llama_cpp"]["Q4_1"]["tokens_per_s_median"]
    genai = result["ort_genai"]["tokens_per_s_median"]
    streams = {(r["precision"], r["config"], r["streams"]): r["tokens_per_s"] for r in result["streams"]}

    def rate(name: str) -> float:
        return one[name]["tokens_per_s_median"]

    full, early = rate("int4, int8 activations full"), rate("int4, int8 activations early δ=0.9")
    fused, unfused = rate("float32 full"), rate("float32, layer by layer full")
    at_16, peer_16 = streams[("int4, int8 activations", "full", 16)], streams[("llama.cpp Q4_1", "full", 16)]
    section = prose(REPO / "BENCHMARKS.md").split("## Language models II")[1].split("\n## ")[0]
    for quoted in (
        f"float32 full depth {fused:.1f} tokens/s against {unfused:.1f} layer by layer (**{fused / unfused:.2f}×**)",
        f"activations {full:.1f} against {rate('int4, int8 activations, layer by layer full'):.1f} "
        f"(**{full / rate('int4, int8 activations, layer by layer full'):.2f}×**)",
        f"**With fused segments (design-effect tables, 16 WikiText-2 prompts, before lookup drafts): "
        f"{one['float32 exact (draft δ=0.8)']['ratio_to_float32_full_median']:.2f}×, still",
        f"**With fused segments: {one['float32 early δ=0.9']['ratio_to_float32_full_median']:.2f}×, still missed**",
        f"met with int8 activations — {full:.1f} vs {peer:.1f} tokens/s, {full / peer:.2f}×**",
        f"the exact-safe int4 {rate('int4 full'):.1f}, **{rate('int4 full') / peer:.2f}×, missed**",
        f"**{at_16:.1f} vs {peer_16:.1f}, {at_16 / peer_16:.2f}×: met, barely**",
        f"{early:.1f} vs {peer:.1f} ({early / peer:.2f}×)**",
        f"{genai:.1f} tokens/s at one stream (our int4 with int8 activations is {full / genai:.2f}× of it at full depth",
        f"{early / genai:.2f}× at δ 0.9) and **{streams[('ONNX Runtime GenAI int4', 'full', 16)]:.1f} at 16 streams",
    ):
        assert quoted in section, quoted
    assert full / peer >= 0.8 and early > peer and at_16 > peer_16  # the goals the prose calls met
    assert rate("int4 full") / peer < 0.8 and one["float32 exact (draft δ=0.8)"]["ratio_to_float32_full_median"] < 1.3


def test_the_draft_adapter_and_memory_figures_match_their_results() -> None:
    adapter = json.loads((figures.RESULTS / "llm-draft-adapter.json").read_text())
    memory = {(r["precision"], r["fused_segments"]): r["rss_mib"]
              for r in json.loads((figures.RESULTS / "llm-memory.json").read_text())["rows"]}
    section = prose(REPO / "BENCHMARKS.md").split("## Language models II")[1].split("\n## ")[0]
    assert (f"**{100 * adapter['adapter']['agreement']:.1f} % top-1 agreement** on WikiText-2 test, against "
            f"{100 * adapter['mlp_head']['agreement']:.1f} % for the residual MLP head") in section
    assert adapter["adapter"]["agreement"] < adapter["mlp_head"]["agreement"]  # why it was not built in
    assert (f"{memory[('float32', True)]:.0f} MiB against {memory[('float32', False)]:.0f} at float32, "
            f"{memory[('int4', True)]:.0f} against {memory[('int4', False)]:.0f} at int4") in section


def test_the_longer_training_figures_match_their_result() -> None:
    result = json.loads((figures.RESULTS / "headline-cascade-sd24" / "headline.json").read_text())
    at_w64 = {p: result["summary"][p]["cifar10-cascade-w64-e24"]["ratio_mean"] for p in ("pcee", "confidence", "pcee-lb-tail")}
    split = result["splits"][0]
    static = {s["name"]: s["error"] for s in split["smalls"]}["cifar10-cascade-w64-e24"]
    exits = " / ".join(f"{100 * e['error']:.2f}" for e in split["large"]["exits"])
    section = prose(REPO / "BENCHMARKS.md").split("### 4.5 ")[1].split("\n## ")[0]
    sixteen = json.loads((figures.RESULTS / "headline-cascade-sd" / "headline.json").read_text())
    before = {s["name"]: s["error"] for s in sixteen["splits"][0]["smalls"]}["cifar10-cascade-w64"]
    assert f"from {100 * before:.2f} % to {100 * static:.2f} % (split 0), the cascade's exits to {exits} %" in section
    assert (f"**{at_w64['pcee']:.3f} (`pcee`), {at_w64['confidence']:.3f} (`confidence`),\n"
            f"{at_w64['pcee-lb-tail']:.3f} (`pcee-lb-tail`)**") in (REPO / "BENCHMARKS.md").read_text()
    assert at_w64["pcee"] > sixteen["summary"]["pcee"]["cifar10-cascade-w64"]["ratio_mean"]  # "rose"


def test_the_lookup_draft_figures_match_their_result() -> None:
    """BENCHMARKS' lookup-draft paragraph quotes llm-lookup.json (WikiText-2 and chat prompts)."""
    result = json.loads((figures.RESULTS / "llm-lookup.json").read_text())
    section = prose(REPO / "BENCHMARKS.md").split("## Language models II")[1].split("\n## ")[0]

    def ratio(prompts: str, name: str) -> str:
        return f"{result[prompts][name]['ratio_to_float32_full_median']:.2f}×"

    wiki, chat = "wikitext-2", "chat"
    early, exact = "early δ=0.9", "exact (draft δ=0.8)"
    for quoted in (
        f"δ 0.9 **{ratio(wiki, f'float32 {early}')}** full depth ({ratio(wiki, f'float32, no lookup {early}')} without lookup)",
        f"exact mode **{ratio(wiki, f'float32 {exact}')}** ({ratio(wiki, f'float32, no lookup {exact}')} without lookup, "
        f"{ratio(wiki, f'float32, no lookup, every exit drafts {exact}')} with neither change)",
        f"δ 0.9 **{ratio(chat, f'float32 {early}')}** ({ratio(chat, f'float32, no lookup {early}')}), exact mode "
        f"**{ratio(chat, f'float32 {exact}')}** ({ratio(chat, f'float32, no lookup {exact}')} without lookup, "
        f"**{ratio(chat, f'float32, no lookup, every exit drafts {exact}')} with neither change**",
    ):
        assert quoted in section, quoted
    assert result[wiki][f"float32 {exact}"]["identical_to_same_precision_full"] == 1.0
    assert result[chat][f"float32 {exact}"]["identical_to_same_precision_full"] == 1.0


def test_the_exit_ensemble_figures_match_their_result() -> None:
    result = json.loads((figures.RESULTS / "headline-cascade-sd" / "ensemble.json").read_text())
    section = prose(REPO / "BENCHMARKS.md").split("### 4.5 ")[1].split("\n## ")[0]
    ratio = {name: {p: f"{c['ratio']:.3f}" for p, c in by_policy.items()} for name, by_policy in result["comparison"].items()}
    assert (f"the ratio goes from {ratio['plain']['pcee']} to {ratio['ensembled']['pcee']} (`pcee`) and "
            f"{ratio['plain']['confidence']} to {ratio['ensembled']['confidence']} (`confidence`)") in section
    weights = result["chosen_weights"]
    assert f"the chosen weights ({weights[1]:g} at the middle exit, {weights[2]:g} at the last)" in section
    moved = max(abs(r["test_error"] - e["rows"][0]["test_error"]) for e in result["per_exit"] for r in e["rows"]
                if r["weight"] == e["chosen_weight"])
    assert f"move test error by at most {100 * moved:.2f} points" in section


def test_the_lookup_goal_figures_match_their_results() -> None:
    """The issue 28 goal lines after lookup drafts quote llm-precision.json, llm-exact-100.json and llm-lookup.json."""
    one = json.loads((figures.RESULTS / "llm-precision.json").read_text())["one_stream"]
    hundred = json.loads((figures.RESULTS / "llm-exact-100.json").read_text())["one_stream"]
    chat = json.loads((figures.RESULTS / "llm-lookup.json").read_text())["chat"]
    section = prose(REPO / "BENCHMARKS.md").split("## Language models II")[1].split("\n## ")[0]
    early, exact = "early δ=0.9", "exact (draft δ=0.8)"

    def ratio(rows: dict, name: str) -> float:
        return rows[name]["ratio_to_float32_full_median"]

    int4 = ratio(one, "int4 full")
    for quoted in (
        f"met on WikiText-2 prompts — {ratio(hundred, f'float32 {exact}'):.2f}× on 100 prompts, identical to greedy on "
        f"{round(100 * hundred[f'float32 {exact}']['identical_to_same_precision_full'])} / 100**",
        f"{ratio(one, f'float32 {exact}'):.2f}× on the 16 of the tables; **on held-out chat prompts "
        f"{ratio(chat, f'float32 {exact}'):.2f}×, missed**",
        f"met on WikiText-2 prompts — {ratio(hundred, f'float32 {early}'):.2f}× on the 100 prompts, "
        f"{ratio(one, f'float32 {early}'):.2f}× on the 16** (without lookup {ratio(one, f'float32, no lookup {early}'):.2f}×",
        f"**on held-out chat prompts {ratio(chat, f'float32 {early}'):.2f}×, missed**",
        f"(δ 0.9 {ratio(one, f'int4 {early}') / int4:.2f}× and exact {ratio(one, f'int4 {exact}') / int4:.2f}× of int4 full depth)",
        f"(δ 0.9 {one[f'int4, int8 activations {early}']['tokens_per_s_median']:.1f} tokens/s with them, "
        f"{one[f'int4, int8 activations, no lookup {early}']['tokens_per_s_median']:.1f} without",
    ):
        assert quoted in section, quoted
    assert ratio(hundred, f"float32 {exact}") >= 1.3 and ratio(hundred, f"float32 {early}") >= 1.5  # "met"
    assert ratio(chat, f"float32 {exact}") < 1.3 and ratio(chat, f"float32 {early}") < 1.5  # "missed"


def test_the_peer_figures_of_the_lookup_run_match_its_result() -> None:
    result = json.loads((figures.RESULTS / "llm-precision.json").read_text())
    one, peer = result["one_stream"], result["llama_cpp"]["Q4_1"]["tokens_per_s_median"]
    streams = {(r["precision"], r["config"], r["streams"]): r["tokens_per_s"] for r in result["streams"]}
    before = json.loads((figures.RESULTS / "llm-precision-before-lookup.json").read_text())["llama_cpp"]["Q4_1"]
    section = prose(REPO / "BENCHMARKS.md").split("## Language models II")[1].split("\n## ")[0]
    full = one["int4, int8 activations full"]["tokens_per_s_median"]
    at_16, peer_16 = streams[("int4, int8 activations", "full", 16)], streams[("llama.cpp Q4_1", "full", 16)]
    genai = result["ort_genai"]["tokens_per_s_median"]
    for quoted in (
        f"llama.cpp Q4_1 {peer:.1f} tokens/s at one stream against {before['tokens_per_s_median']:.1f} in the run before",
        f"int4 with int8 activations {full:.1f} vs {peer:.1f} at one stream (**{full / peer:.2f}×, met**)",
        f"δ 0.9 on it {one['int4, int8 activations early δ=0.9']['tokens_per_s_median']:.1f} (**met**)",
        f"{at_16:.1f} vs {peer_16:.1f} (**{at_16 / peer_16:.2f}×: a tie, missed by {100 * (1 - at_16 / peer_16):.0f} %**",
        f"ONNX Runtime GenAI: {genai:.1f} at one stream, {streams[('ONNX Runtime GenAI int4', 'full', 16)]:.1f} at 16.",
    ):
        assert quoted in section, quoted
    assert full / peer >= 0.8 and at_16 < peer_16


def test_the_kv_pool_figures_match_their_result() -> None:
    result = json.loads((figures.RESULTS / figures.LLM_POOL).read_text())
    streams = {(r["precision"], r["config"], r["streams"]): r["tokens_per_s"] for r in result["streams"]}
    section = prose(REPO / "BENCHMARKS.md").split("## Language models II")[1].split("\n## ")[0]
    act, act_plain = "int4, int8 activations", "int4, int8 activations, no KV pool"
    at_16, plain_16, peer_16 = (streams[(act, "full", 16)], streams[(act_plain, "full", 16)],
                                streams[("llama.cpp Q4_1", "full", 16)])
    one, peer_one = (result["one_stream"][f"{act} full"]["tokens_per_s_median"],
                     result["llama_cpp"]["Q4_1"]["tokens_per_s_median"])
    for quoted in (
        f"**{at_16:.1f} tokens/s against {plain_16:.1f} without the pool ({at_16 / plain_16:.2f}×)**",
        f"at 4 streams {streams[(act, 'full', 4)]:.1f} against {streams[(act_plain, 'full', 4)]:.1f} "
        f"({streams[(act, 'full', 4)] / streams[(act_plain, 'full', 4)]:.2f}×)",
        f"float32 at 16 streams {streams[('float32', 'full', 16)]:.1f} against "
        f"{streams[('float32, no KV pool', 'full', 16)]:.1f}",
        f"the exact-safe int4 {streams[('int4', 'full', 16)]:.1f} against {streams[('int4, no KV pool', 'full', 16)]:.1f}",
        f"llama.cpp Q4_1 **{peer_16:.1f} at 16 streams** ({streams[('llama.cpp Q4_1', 'full', 4)]:.1f} at 4)",
        f"ONNX Runtime GenAI {streams[('ONNX Runtime GenAI int4', 'full', 16)]:.1f} at 16",
        f"float32 {streams[('float32', 'early δ=0.9', 16)]:.1f} against {streams[('float32', 'full', 16)]:.1f}",
        f"**{at_16:.1f} vs {peer_16:.1f} ({at_16 / peer_16:.2f}×): met**",
        f"without the pool, same run: {plain_16:.1f}, {plain_16 / peer_16:.2f}×",
        f"at one stream {one:.1f} vs {peer_one:.1f} ({one / peer_one:.2f}×)",
    ):
        assert quoted in section, quoted
    assert at_16 > 1.2 * peer_16 and at_16 > plain_16


def test_the_lookup_length_figures_match_their_result() -> None:
    result = json.loads((figures.RESULTS / "llm-lookup-length.json").read_text())
    one, cost = result["one_stream"], result["row_cost"]
    section = prose(REPO / "BENCHMARKS.md").split("## Language models II")[1].split("\n## ")[0]
    act = "int4, int8 activations"
    paying, room, none = (one[f"{act}{variant} early δ=0.9"] for variant in ("", ", lookup to the room", ", no lookup"))
    for quoted in (
        f"measured row cost {cost['float32']:.3f} at float32 and {cost[act]:.3f} with int8 activations",
        f"**{paying['tokens_per_s_median']:.1f} tokens/s, against {room['tokens_per_s_median']:.1f} with drafts to "
        f"the room and {none['tokens_per_s_median']:.1f} without lookup**",
        f"(per-prompt ratios to float32 full depth {paying['ratio_to_float32_full_median']:.2f}, "
        f"{room['ratio_to_float32_full_median']:.2f} and {none['ratio_to_float32_full_median']:.2f}), full depth "
        f"{one[f'{act} full']['tokens_per_s_median']:.1f}",
    ):
        assert quoted in section, quoted
    assert paying["tokens_per_s_median"] > max(room["tokens_per_s_median"], none["tokens_per_s_median"])


def test_the_answer_history_figures_match_their_result() -> None:
    result = json.loads((figures.RESULTS / figures.LLM_HISTORY).read_text())
    history, cost = result["history"], result["row_cost"]
    section = prose(REPO / "BENCHMARKS.md").split("## Language models II")[1].split("\n## ")[0]

    def ratio(prompts: str, config: str) -> str:
        return f"{result[prompts][config]['ratio_to_float32_full_median']:.2f}×"

    def share(prompts: str, config: str) -> str:
        return f"{100 * result[prompts][config]['lookup_token_share']:.0f} %"

    h, plain, room = "float32, answer history", "float32", "float32, lookup to the room"
    exact, early = "exact (draft δ=0.8)", "early δ=0.9"
    for quoted in (
        f"greedy answers to the {history['answers_generated']} `train` and `calibration` chat prompts, of which "
        f"the newest {history['tokens_kept']:,} tokens fit",
        f"exact mode **{ratio('chat', f'{h} {exact}')}** full depth with the history against "
        f"{ratio('chat', f'{plain} {exact}')} without (kept lookup drafts {share('chat', f'{h} {exact}')} of the "
        f"tokens against {share('chat', f'{plain} {exact}')})",
        f"δ 0.9 **{ratio('chat', f'{h} {early}')}** against {ratio('chat', f'{plain} {early}')}",
        f"on WikiText-2 prompts exact {ratio('wikitext-2', f'{h} {exact}')} against "
        f"{ratio('wikitext-2', f'{plain} {exact}')}, δ 0.9 {ratio('wikitext-2', f'{h} {early}')} either way",
        f"At float32 a row costs {cost[h]:.2f} of a step",
        f"({ratio('wikitext-2', f'{room} {early}')} against {ratio('wikitext-2', f'{plain} {early}')} at δ 0.9",
        f"on held-out chat prompts {ratio('chat', f'{h} {exact}')}, missed by "
        f"{1.3 - result['chat'][f'{h} {exact}']['ratio_to_float32_full_median']:.2f}**",
        f"({ratio('chat', f'{plain} {exact}')} without it in the same run); WikiText-2 prompts "
        f"{ratio('wikitext-2', f'{h} {exact}')}",
        f"held-out chat prompts δ 0.9 **{ratio('chat', f'{h} {early}')}, still missed** "
        f"({ratio('chat', f'{plain} {early}')} without it",
    ):
        assert quoted in section, quoted
    assert ratio("wikitext-2", f"{h} {early}") == ratio("wikitext-2", f"{plain} {early}")  # "either way"
    assert cost[h] * 8 <= 1.0  # float32 drafts fill the room: both rows run the same rule
