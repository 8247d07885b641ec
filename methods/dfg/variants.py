"""DFG's variant names and its ablation grid: one table of name tokens, read both ways.

A variant name lists DFG's switches: ``fa`` | ``nofa`` (``fa-srcprior``: FA with the source model's mean
prediction as its class prior instead of the paper's uniform one), then either ``-only`` (stop after FA) or
``+<search>`` (naive | tbs | mbs | dbs), ``+nos3`` (stage 3 off; mbs/dbs only), ``+cp`` | ``+nocp``, then the
box-search options that are sfdabench's, not the paper's, each only when it is off its default and in this
order: ``+ltol`` (change tolerances scaled by length), ``+reach`` (step limits scaled to the reference reach),
``+grow1`` (MBS's growth budget), ``+cover-pred50`` / ``+cover-region80`` (coverage before stability),
``+guard-side`` / ``+guard-seed`` (twin guard). Only the guard applies to the naive search. Examples:
``fa+dbs+cp`` (the paper), ``nofa+naive+nocp``, ``fa-only``, ``fa+dbs+cp+ltol+reach``.

:func:`variant_name` names a config (a run's ``variant`` column) and :class:`DfgAblation` turns a name back into
settings; both read :data:`SEARCH_OPTIONS`, so they cannot disagree.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from sfdabench.api import Ablation, UsageError

SEARCHES = ("naive", "tbs", "mbs", "dbs")


@dataclass(frozen=True)
class SearchOption:
    """One optional token of the name: its pattern, its settings, and the token a config gives."""

    pattern: str                                      # regex of the whole token
    defaults: Mapping[str, Any]                       # the search settings when the token is absent (the paper)
    parse: Callable[[re.Match], dict[str, Any]]       # token -> search settings
    token: Callable[[Mapping[str, Any]], str]         # search settings -> token ("" at the defaults)
    naive: bool = False                               # also an option of the naive search


def _choice(key: str, default: str, tokens: Mapping[str, str]) -> SearchOption:
    """An option with named values, e.g. tolerance_scaling area (no token) | length (``ltol``)."""
    by_token = {t: v for v, t in tokens.items() if t}

    def token(search: Mapping[str, Any]) -> str:
        value = str(search.get(key, default))
        if value not in tokens:
            raise ValueError(f"search.{key}={value!r} unknown; use one of {', '.join(tokens)}")
        return tokens[value]

    return SearchOption("|".join(map(re.escape, by_token)), {key: default},
                        lambda m: {key: by_token[m[0]]}, token, naive=key == "twin_guard")


def _growth_token(search: Mapping[str, Any]) -> str:
    growth = float(search.get("mbs_max_growth", 0.0))
    return f"grow{growth:g}" if growth else ""


def _growth(m: re.Match) -> dict[str, Any]:
    if float(m[1]) == 0 or f"{float(m[1]):g}" != m[1]:
        raise ValueError("not a growth the names use")
    return {"mbs_max_growth": float(m[1])}


def _coverage_token(search: Mapping[str, Any]) -> str:
    fraction = float(search.get("min_coverage", 0.0))
    if not fraction:
        return ""
    percent = round(fraction * 100)
    if abs(percent - fraction * 100) > 1e-9 or not 1 <= percent <= 100:
        raise ValueError(f"search.min_coverage={fraction} cannot be named in the variant; use a whole "
                         f"percentage between 0.01 and 1")
    of = str(search.get("coverage_of", "region"))
    if of not in ("region", "prediction"):
        raise ValueError(f"search.coverage_of={of!r} unknown; use one of region, prediction")
    return f"cover-{'pred' if of == 'prediction' else 'region'}{percent}"


#: The box-search options in name order.
SEARCH_OPTIONS = (
    _choice("tolerance_scaling", "area", {"area": "", "length": "ltol"}),
    _choice("steps_scaling", "fixed", {"fixed": "", "reach": "reach"}),
    SearchOption(r"grow([0-9]+(?:\.[0-9]+)?)", {"mbs_max_growth": 0.0}, _growth, _growth_token),
    SearchOption(r"cover-(pred|region)(100|[1-9][0-9]?)", {"min_coverage": 0.0, "coverage_of": "region"},
                 lambda m: {"min_coverage": int(m[2]) / 100,
                            "coverage_of": "prediction" if m[1] == "pred" else "region"}, _coverage_token),
    _choice("twin_guard", "none", {"none": "", "side": "guard-side", "seed": "guard-seed"}),
)


def variant_name(cfg: Mapping[str, Any]) -> str:
    """The variant name of a DFG config (``configs/method/dfg.yaml`` with any overrides)."""
    fa = "fa" if cfg["fa"]["enabled"] else "nofa"
    if fa == "fa" and cfg["fa"].get("prior", "uniform") == "source_prediction":
        fa = "fa-srcprior"          # the paper's uniform prior adds nothing to the name
    if cfg["stop_after_fa"]:
        return f"{fa}-only"
    search = cfg["search"]
    parts = [fa, search["search"]]
    if search["search"] in ("mbs", "dbs") and not search["stage3"]:
        parts.append("nos3")
    parts.append("cp" if cfg["cp"] else "nocp")
    for option in SEARCH_OPTIONS:   # the defaults add nothing, so the names of the paper's variants never change
        if search["search"] != "naive" or option.naive:
            parts.append(option.token(search))
    return "+".join(p for p in parts if p)


def _unknown(variant: str) -> UsageError:
    return UsageError(f"unknown DFG variant '{variant}'; names look like fa+dbs+cp, nofa+naive+nocp, "
                      f"fa+mbs+nos3+cp (stage 3 off; mbs/dbs only), fa+dbs+cp+ltol+reach+grow1+cover-pred50+guard-side "
                      f"(options in this order; ltol, reach, grow and cover not for naive), fa-only, "
                      f"fa-srcprior+dbs+cp (FA with the source model's class prior); the default grid: "
                      f"{','.join(DfgAblation.grids['default'])}")


def variant_settings(variant: str) -> dict[str, Any]:
    """The ``method`` settings of a variant name (every switch set, so the name alone decides the run)."""
    head, *tokens = variant.split("+")
    m = re.fullmatch(r"(fa|nofa)(-srcprior)?(-only)?", head)
    if m is None or (m[2] and m[1] == "nofa"):
        raise _unknown(variant)
    fa: dict[str, Any] = {"enabled": m[1] == "fa"}
    if m[2]:      # only then: the paper's uniform prior is dfg.yaml's default, not a key, so run ids stay
        fa["prior"] = "source_prediction"
    if m[3]:
        if tokens:
            raise _unknown(variant)
        return {"fa": fa, "stop_after_fa": True}
    if not tokens or tokens[0] not in SEARCHES:
        raise _unknown(variant)
    search_name, tokens = tokens[0], tokens[1:]
    stage3 = not (tokens and tokens[0] == "nos3")
    if not stage3:
        if search_name not in ("mbs", "dbs"):
            raise _unknown(variant)
        tokens = tokens[1:]
    if not tokens or tokens[0] not in ("cp", "nocp"):
        raise _unknown(variant)
    cp, tokens = tokens[0] == "cp", tokens[1:]
    search: dict[str, Any] = {"search": search_name, "stage3": stage3}
    for option in SEARCH_OPTIONS:
        search.update(option.defaults)
    next_option = 0
    for token in tokens:   # each token matches a later option than the one before: the name order
        for i in range(next_option, len(SEARCH_OPTIONS)):
            option = SEARCH_OPTIONS[i]
            match = re.fullmatch(option.pattern, token)
            if match and (search_name != "naive" or option.naive):
                try:
                    search.update(option.parse(match))
                except ValueError:
                    raise _unknown(variant) from None
                next_option = i + 1
                break
        else:
            raise _unknown(variant)
    return {"fa": fa, "search": search, "cp": cp, "stop_after_fa": False}


def _coverage_label(search: Mapping[str, Any]) -> str:
    """"off", "pred 0.5", "region 0.8" ("-" for the FA-only row)."""
    if "min_coverage" not in search:
        return "-"
    if not search["min_coverage"]:
        return "off"
    return f"{'pred' if search['coverage_of'] == 'prediction' else 'region'} {search['min_coverage']:g}"


class DfgAblation(Ablation):
    """FA on/off x box search naive/tbs/mbs/dbs x CP on/off, plus FA only (DFG's Tables); and the search options."""

    grids = {
        "default": ["fa-only"] + [f"{fa}+{search}+{cp}" for fa in ("fa", "nofa") for search in SEARCHES
                                  for cp in ("cp", "nocp")],
        "search_options": ["fa+dbs+cp", "fa+dbs+cp+ltol", "fa+dbs+cp+reach", "fa+dbs+cp+ltol+reach",
                           "fa+dbs+cp+grow1", "fa+dbs+cp+cover-pred50", "fa+dbs+cp+cover-region80",
                           "fa+dbs+cp+guard-side", "fa+dbs+cp+guard-seed"],
    }
    reference = "fa+dbs+cp"
    optional_cells = ("tolerances", "step limits", "MBS growth budget", "coverage", "twin guard")

    def settings(self, variant: str) -> dict[str, Any]:
        return variant_settings(variant)

    def columns(self, variant: str) -> dict[str, Any]:
        """fa, search, stage3, cp, tolerances, steps, growth, coverage, guard ("-" where the FA-only row has no
        such phase)."""
        sw = variant_settings(variant)
        search = sw.get("search", {})
        return {"fa": sw["fa"]["enabled"], "search": search.get("search", "-"), "stage3": search.get("stage3", "-"),
                "cp": sw.get("cp", "-"), "tolerances": search.get("tolerance_scaling", "-"),
                "steps": search.get("steps_scaling", "-"),
                "growth": ("-" if "mbs_max_growth" not in search
                           else f"{search['mbs_max_growth']:g}" if search["mbs_max_growth"] else "off"),
                "coverage": _coverage_label(search),
                "guard": search.get("twin_guard", "-")}

    def cells(self, variant: str) -> dict[str, str]:
        col = self.columns(variant)
        fa_only = col["search"] == "-"
        return {"FA": "yes" if col["fa"] else "no", "search": "(stop after FA)" if fa_only else col["search"],
                "CP": "-" if fa_only else ("yes" if col["cp"] else "no"),
                "tolerances": str(col["tolerances"]), "step limits": str(col["steps"]),
                "MBS growth budget": str(col["growth"]), "coverage": str(col["coverage"]),
                "twin guard": str(col["guard"])}
