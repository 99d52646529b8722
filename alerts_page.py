"""The page's parts for alerts that leave the page and alerts an engineer has quieted: what exclusion rules
suppressed, how delivery goes (sent, given up), and the settings: exclusion rules (add, edit, remove,
export, import), per-detector switches and thresholds (applied to the running capture), and the
notification destinations. dashboard.py calls alert_extras() under the alerts and settings() once per page.

Secrets are never echoed back: the webhook URL field starts empty and the current one is shown as its
scheme and host only; the SMTP password and the webhook token are never fields (config, the environment or
files it names) and go only to the destinations config names. Destinations are editable only by a viewer
signed in with ACCESS_PASSWORD; without one they are shown read-only.
Text from rules and alerts is shown in tables (text, not Markdown) or through plain().
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import streamlit as st

import config
from analysis.detect import DETECTOR_NAMES, THRESHOLDS
from analysis.rules import DIRECTIONS, Rule, RuleError
from notify.destinations import Webhook

NEW_RULE = "(new rule)"
# What each threshold is for, on the page (the settings table in README says more).
THRESHOLD_OF = {"port_scan": ("SCAN_PORTS", "SCAN_HOSTS", "SCAN_STEALTH_PORTS"), "syn_flood": ("SYN_FLOOD_PPS",),
                "icmp_flood": ("ICMP_FLOOD_PPS",), "udp_flood": ("UDP_FLOOD_PPS",),
                "reflection": ("REFLECTION_BPS", "REFLECTION_SOURCES"),
                "spike": ("SPIKE_SIGMAS", "SPIKE_MIN_PPS", "SPIKE_WARMUP_S"), "new_host": ("NEW_HOST_LEARN_S",),
                "arp_spoof": ()}
assert set(sum(THRESHOLD_OF.values(), ())) == set(THRESHOLDS)
_MARKDOWN = str.maketrans({c: f"\\{c}" for c in "\\`*_{}[]()#+-.!|<>~$:"})


def plain(text: str) -> str:
    """Text shown as itself where Streamlit reads Markdown."""
    return str(text).translate(_MARKDOWN)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC") if ts else "never"


# -- under the alerts ---------------------------------------------------------------------


def alert_extras(snap: Any, engine: Any) -> None:
    """What exclusion rules suppressed, and how delivery to the destinations goes."""
    counts, rows = engine.alerts.excluded()
    if counts:
        each = ", ".join(f"{n:,} by rule {name}" for name, n in sorted(counts.items()))
        st.caption(plain(f"{sum(counts.values()):,} alerts suppressed by exclusion rules ({each}): counted, "
                         f"not raised or sent."))
        st.dataframe(pd.DataFrame({"suppressed by rule": [r for r, _ in rows],
                                   "detector": [a.detector for _, a in rows], "source": [a.source for _, a in rows],
                                   "target": [a.target for _, a in rows], "count": [a.count for _, a in rows],
                                   "evidence": [a.evidence for _, a in rows]}),
                     hide_index=True, key="alerts_excluded")
    delivery_status((snap.totals or {}).get("notify") or engine.notifier.status())


def delivery_status(status: dict[str, Any]) -> None:
    """Per destination: sent, given up (after the retry budget or a full queue), rate-limited, the last error."""
    for e in status.get("errors") or ():
        st.error(plain(f"Notification destination not used: {e}"))
    for d in status.get("destinations") or ():
        line = (f"Notifications to {d['destination']}: {d['sent']:,} sent, {d['given_up']:,} given up, "
                f"{d['rate_suppressed']:,} over the rate limit, {d['waiting']:,} waiting")
        if d["given_up"]:
            st.warning(plain(f"{line}. Last error: {d['last_error'] or 'the queue was full'}"))
        else:
            st.caption(plain(line + (f" (last error: {d['last_error']})" if d["last_error"] else "")))


# -- settings -------------------------------------------------------------------------------


def settings(engine: Any) -> None:
    """Exclusion rules, detector switches and thresholds, destinations (for a signed-in viewer: the page
    shows nothing at all before the password when ACCESS_PASSWORD is set)."""
    controls = engine.controls
    # Drawn only when asked for: the forms stay out of the page (and its refreshes) until a viewer opens them.
    if not st.toggle("Alert rules, detectors and notifications", key="ap_show"):
        return
    with st.container(border=True):
        if controls.error:
            st.error(plain(controls.error))
        if controls.store is None:
            st.caption("No history store: changes apply to this run only.")
        _feedback()
        rules, detectors, dests = st.tabs(["Exclusion rules", "Detectors", "Notifications"])
        with rules:
            rules_section(controls, engine.alerts.excluded()[0])
        with detectors:
            detectors_section(controls)
        with dests:
            destinations_section(controls)


FEEDBACK_S = 10.0  # how long a change's outcome stays on the page


def _run(action, *args) -> None:
    """Run a settings change from a button; its outcome is shown for FEEDBACK_S seconds."""
    try:
        out = action(*args)
    except (RuleError, ValueError, OSError) as exc:
        st.session_state["ap_outcome"] = ("error", str(exc), time.monotonic())
        return
    st.session_state["ap_outcome"] = ("done", out if isinstance(out, str) else "Saved.", time.monotonic())


def _run_now(action) -> None:
    """_run from a form's submit button (in the script's flow, after _feedback was drawn): run the page again
    at once so that the outcome shows now, not at the next refresh."""
    _run(action)
    st.rerun()


def _feedback() -> None:
    """The outcome of the last change, for FEEDBACK_S seconds: shown once, it could last a single 2 s
    refresh, or none at all when the next auto-refresh interrupted the run that drew it."""
    outcome = st.session_state.get("ap_outcome")
    if outcome is None:
        return
    kind, text, at = outcome
    if time.monotonic() - at > FEEDBACK_S:
        del st.session_state["ap_outcome"]
    elif kind == "error":
        st.error(plain(text))
    else:
        st.success(plain(text))


def rules_section(controls: Any, counts: dict[str, int]) -> None:
    """The rules list, a form to add or edit one, remove, export and import."""
    rules = sorted(controls.rules.values(), key=lambda r: r.name)
    if rules:
        _rules_table(rules, counts)
    else:
        st.caption("No exclusion rules: every alert is raised and sent.")
    chosen = st.selectbox("Add or edit", [NEW_RULE, *(r.name for r in rules)], key="ap_rule_pick")
    rule = controls.rules.get(chosen) if chosen != NEW_RULE else None
    _rule_form(controls, rule)
    left, right = st.columns(2)
    if rule is not None:
        left.button(f"Remove rule {chosen}", key="ap_rule_remove", on_click=_run,
                    args=(lambda n=chosen: f"Removed rule {n}." if controls.remove_rule(n) else "No such rule.",))
    if rules:
        right.download_button("Export rules (JSON)", controls.export_rules(), file_name="ntm-exclusions.json",
                              mime="application/json", key="ap_rules_export")
    upload = None
    if st.checkbox("Import rules from a file", key="ap_rules_import_open"):
        upload = st.file_uploader("Import rules (an exported JSON file)", type=["json"], key="ap_rules_file")
    if upload is not None:
        st.button("Import these rules", key="ap_rules_import", on_click=_run,
                  args=(lambda u=upload: f"Imported {controls.import_rules(u.getvalue())} rule(s).",))


def _rules_table(rules: list[Rule], counts: dict[str, int]) -> None:
    now = time.time()
    st.dataframe(pd.DataFrame({
        "rule": [r.name for r in rules], "detector": [r.detector or "any" for r in rules],
        "source": [r.source or "any" for r in rules], "target": [r.target or "any" for r in rules],
        "port": [r.port or "any" for r in rules], "direction": [r.direction or "any" for r in rules],
        "expires": [("expired " if r.expired(now) else "") + _when(r.expires) for r in rules],
        "suppressed": [counts.get(r.name, 0) for r in rules], "comment": [r.comment for r in rules]},
        columns=["rule", "detector", "source", "target", "port", "direction", "expires", "suppressed", "comment"]),
        hide_index=True, key="ap_rules")


def _rule_form(controls: Any, rule: Rule | None) -> None:
    r = rule or Rule(name="")
    suffix = r.name or "new"
    with st.form(key=f"ap_rule_form_{suffix}"):
        name = st.text_input("Rule name", value=r.name, key=f"ap_r_name_{suffix}")
        detector = st.selectbox("Detector", ["any", *DETECTOR_NAMES],
                                index=(["any", *DETECTOR_NAMES].index(r.detector) if r.detector else 0),
                                key=f"ap_r_det_{suffix}")
        source = st.text_input("Source (address or CIDR; empty: any)", value=r.source, key=f"ap_r_src_{suffix}")
        target = st.text_input("Target (address or CIDR; empty: any)", value=r.target, key=f"ap_r_dst_{suffix}")
        port = st.number_input("Port (0: any)", 0, 65535, int(r.port), key=f"ap_r_port_{suffix}")
        direction = st.selectbox("Direction", ["any", *DIRECTIONS[1:]],
                                 index=(["any", *DIRECTIONS[1:]].index(r.direction) if r.direction else 0),
                                 key=f"ap_r_dir_{suffix}")
        left = max(0.0, (r.expires - time.time()) / 3600) if r.expires else 0.0
        hours = st.number_input("Expires in hours (0: never)", 0.0, 24.0 * 3650, round(left, 2),
                                key=f"ap_r_exp_{suffix}")
        comment = st.text_input("Comment (why)", value=r.comment, key=f"ap_r_comment_{suffix}")
        if st.form_submit_button("Save rule", key=f"ap_r_save_{suffix}"):
            data = {"name": name, "detector": "" if detector == "any" else detector, "source": source,
                    "target": target, "port": int(port), "direction": "" if direction == "any" else direction,
                    "expires": time.time() + hours * 3600 if hours else 0, "comment": comment}
            _run_now(lambda: f"Saved rule {controls.put_rule(data, replaces=rule.name if rule else None).name}.")
            st.rerun()


def detectors_section(controls: Any) -> None:
    """A switch per detector and its thresholds; Apply hands them to the running detectors."""
    st.caption("Changes apply to the running capture from its next batch, without a restart.")
    with st.form(key="ap_detectors"):
        enabled, values = {}, {}
        for det in DETECTOR_NAMES:
            enabled[det] = st.checkbox(det, value=det not in controls.disabled, key=f"ap_on_{det}")
            for name in THRESHOLD_OF[det]:
                default = config.get(name)
                current = controls.threshold(name)
                if isinstance(default, float):
                    values[name] = st.number_input(name, value=float(current), key=f"ap_th_{name}", format="%g")
                else:
                    values[name] = st.number_input(name, value=int(current), step=1, key=f"ap_th_{name}")
        if st.form_submit_button("Apply to the running detectors", key="ap_detectors_apply"):
            off = {d for d, on in enabled.items() if not on}
            done = f"off: {', '.join(sorted(off))}" if off else "every detector on"
            _run_now(lambda: controls.set_detectors(values, off) or f"Applied to the running detectors ({done}).")
            st.rerun()


def may_edit_destinations() -> bool:
    """Destinations are changed on the page only by a signed-in viewer: ACCESS_PASSWORD set and given
    (without it anyone reaching the page could send the alerts, and the network's details, anywhere)."""
    return bool(config.get("ACCESS_PASSWORD")) and bool(st.session_state.get("signed_in"))


def destinations_section(controls: Any) -> None:
    """Webhook, syslog and e-mail settings; the webhook URL is write-only, the password never a field;
    read-only unless a viewer signed in with ACCESS_PASSWORD."""
    current = controls.notifier.settings.values
    shown = _masked(current.get("NOTIFY_WEBHOOK") or "")
    st.caption(plain(f"Webhook: {shown}. Syslog: {current.get('NOTIFY_SYSLOG') or 'not set'}. "
                     f"E-mail: {current.get('NOTIFY_EMAIL_TO') or 'not set'}"
                     f"{' via ' + str(current.get('SMTP_HOST')) if current.get('SMTP_HOST') else ''}. "
                     f"The SMTP password (SMTP_PASSWORD_FILE or the SMTP_PASSWORD environment variable) and the "
                     f"webhook token (NOTIFY_WEBHOOK_TOKEN_FILE) come from the configuration and go only to the "
                     f"SMTP server and webhooks configured there, never to ones set on this page."))
    if not may_edit_destinations():
        st.info("Destinations are read-only here: they can be changed on this page only when ACCESS_PASSWORD is "
                "set and you have signed in. Set them in the configuration (NTM_NOTIFY_WEBHOOK, "
                "NTM_NOTIFY_SYSLOG, NTM_NOTIFY_EMAIL_TO, NTM_SMTP_HOST, ...).")
        return
    _destinations_form(controls, current)


def _destinations_form(controls: Any, current: dict[str, Any]) -> None:
    with st.form(key="ap_dest", clear_on_submit=True):  # the typed webhook URL is not kept in the field
        new_hook = st.text_input("Webhook URLs, separated by spaces (write-only: leave empty to keep the current "
                                 "ones)", value="", type="password", key="ap_d_hook")
        drop_hook = st.checkbox("Remove the webhooks set on this page", value=False, key="ap_d_hook_off")
        syslog = st.text_input("Syslog (udp://HOST:PORT or tcp://HOST:PORT, several separated by spaces)",
                               value=current.get("NOTIFY_SYSLOG") or "", key="ap_d_syslog")
        email = st.text_input("E-mail to (comma-separated)", value=current.get("NOTIFY_EMAIL_TO") or "",
                              key="ap_d_email")
        host = st.text_input("SMTP host", value=current.get("SMTP_HOST") or "", key="ap_d_smtp_host")
        port = st.number_input("SMTP port", 1, 65535, int(current.get("SMTP_PORT") or 587), key="ap_d_smtp_port")
        user = st.text_input("SMTP user (logs in only on the configured SMTP server)",
                             value=current.get("SMTP_USER") or "", key="ap_d_smtp_user")
        digest = st.number_input("E-mail digest every N minutes (0: one message per alert)", 0, 1440,
                                 int(current.get("NOTIFY_DIGEST_MIN") or 0), key="ap_d_digest")
        if st.form_submit_button("Save destinations", key="ap_d_save"):
            page_hook = controls.destinations.get("NOTIFY_WEBHOOK", "")
            values = {"NOTIFY_WEBHOOK": "" if drop_hook else (new_hook.strip() or page_hook),
                      "NOTIFY_SYSLOG": syslog.strip(), "NOTIFY_EMAIL_TO": email.strip(), "SMTP_HOST": host.strip(),
                      "SMTP_PORT": int(port), "SMTP_USER": user.strip(), "NOTIFY_DIGEST_MIN": int(digest)}
            _run(lambda: _saved(controls.set_destinations(values)))
            del st.session_state["ap_d_hook"]  # the typed URL is not kept, not even in this session's state
            st.rerun()


def _saved(errors: list[str]) -> str:
    if errors:
        raise ValueError("; ".join(errors))
    return "Destinations saved."


def _masked(urls: str) -> str:
    """Webhooks as their scheme and host only (a path is often the token)."""
    out = []
    for url in str(urls).split():
        try:
            out.append(Webhook(url).describe())
        except ValueError:
            out.append("one set (not a valid URL)")
    return ", ".join(out) or "not set"
