"""What the page changes on a running engine: exclusion rules, detector switches and thresholds, and the
notification destinations. Saved as documents in the history store (so they survive a restart) and
handed to the running detector stage as one control message (no restart of the capture)."""

from __future__ import annotations

import logging
import threading
from typing import Any

import config
from analysis.detect import DETECTOR_NAMES, THRESHOLDS
from analysis.rules import RULES_MAX, Rule, RuleError, export_text, import_text, rule_from
from analysis.stages import config_message
from notify.notifier import PAGE_FIELDS, Notifier

log = logging.getLogger(__name__)

RULE_KIND, DETECTORS_KIND, NOTIFY_KIND = "exclusion", "detectors", "notify"
SETTINGS_DOC = "settings"


class AlertControls:
    """Rules, detector settings and destinations of one engine; thread-safe."""

    def __init__(self, store: Any, notifier: Notifier, stage, local_nets: list[str]) -> None:
        """store: the engine's history store (None: kept in memory only); stage: returns the running detector
        stage (or None); local_nets: the networks a rule's direction is judged against."""
        self.store, self.notifier, self._stage, self.local_nets = store, notifier, stage, local_nets
        self._lock = threading.Lock()
        self.rules: dict[str, Rule] = {}
        self.overrides: dict[str, Any] = {}
        self.disabled: frozenset[str] = frozenset()
        self.destinations: dict[str, Any] = {}
        self.error: str | None = None  # the last failure to save or load (the page shows it)
        self._load()
        self.notifier.configure(self.destinations)

    def use_store(self, store: Any) -> None:
        """Read (and from now on save) rules and settings in `store`: a fleet sensor's ClickHouse, shared by
        every sensor of the fleet."""
        self.store = store
        self._load()
        self.notifier.configure(self.destinations)

    def _load(self) -> None:
        """Rules, detector settings and destinations saved in the store; a bad saved entry is skipped, logged."""
        if self.store is None:
            return
        try:
            for d in self.store.docs(RULE_KIND):
                try:
                    self.rules[d["name"]] = rule_from(d["body"], DETECTOR_NAMES)
                except RuleError as exc:
                    log.error("exclusion rule %r in the store is not valid and is not applied: %s", d["name"], exc)
            for d in self.store.docs(DETECTORS_KIND):
                if d["name"] == SETTINGS_DOC:
                    self.overrides = self._valid_overrides(d["body"].get("overrides") or {})
                    self.disabled = frozenset(n for n in d["body"].get("disabled") or () if n in DETECTOR_NAMES)
            for d in self.store.docs(NOTIFY_KIND):
                if d["name"] == SETTINGS_DOC:
                    self.destinations = {k: v for k, v in d["body"].items() if k in PAGE_FIELDS}
        except (OSError, ValueError) as exc:
            self.error = f"saved rules and settings could not be read: {exc}"
            log.error("%s", self.error)

    # -- to the detectors ---------------------------------------------------------------

    def message(self) -> bytes:
        """The control message with everything the detectors need."""
        with self._lock:
            return config_message(self.overrides, self.disabled, [r.as_dict() for r in self.rules.values()],
                                  self.local_nets)

    def apply(self, stage: Any = None) -> None:
        """Hand the current settings to a detector stage (a new one, or the running one)."""
        stage = stage if stage is not None else self._stage()
        if stage is not None and stage.error is None:
            stage.configure(self.message())

    def _save(self, kind: str, name: str, body: dict | None) -> None:
        """Store a document (None deletes it). A store that fails does not stop the change: it applies to
        the running capture, and the error (shown on the page) says it will not survive a restart."""
        if self.store is None:
            return
        try:
            if body is None:
                self.store.delete_doc(kind, name)
            else:
                self.store.put_doc(kind, name, body)
            self.error = None
        except OSError as exc:
            self.error = f"applied to this run but not saved in the history store (lost at a restart): {exc}"
            log.error("%s", self.error)

    # -- rules ------------------------------------------------------------------------------

    def put_rule(self, data: dict[str, Any], replaces: str | None = None) -> Rule:
        """Add or edit a rule (RuleError says what is wrong); applied to the running detectors at once."""
        rule = rule_from(data, DETECTOR_NAMES)
        with self._lock:
            if rule.name not in self.rules and replaces is None and len(self.rules) >= RULES_MAX:
                raise RuleError(f"at most {RULES_MAX} rules")
        self._save(RULE_KIND, rule.name, rule.as_dict())
        if replaces and replaces != rule.name:
            self._save(RULE_KIND, replaces, None)
        with self._lock:
            if replaces:
                self.rules.pop(replaces, None)
            self.rules[rule.name] = rule
        self.apply()
        return rule

    def remove_rule(self, name: str) -> bool:
        """Remove a rule; False when there was none."""
        with self._lock:
            if name not in self.rules:
                return False
        self._save(RULE_KIND, name, None)
        with self._lock:
            self.rules.pop(name, None)
        self.apply()
        return True

    def export_rules(self) -> str:
        """Every rule as a JSON file."""
        with self._lock:
            return export_text(sorted(self.rules.values(), key=lambda r: r.name))

    def import_rules(self, text: str | bytes) -> int:
        """Add (or replace, by name) the rules of an exported file; all or nothing. Rules imported."""
        rules = import_text(text, DETECTOR_NAMES)
        with self._lock:
            if len({*self.rules, *(r.name for r in rules)}) > RULES_MAX:
                raise RuleError(f"at most {RULES_MAX} rules")
        for r in rules:
            self._save(RULE_KIND, r.name, r.as_dict())
        with self._lock:
            self.rules.update({r.name: r for r in rules})
        self.apply()
        return len(rules)

    # -- detectors --------------------------------------------------------------------------

    @staticmethod
    def _valid_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for name, value in overrides.items():
            if name not in THRESHOLDS:
                raise ValueError(f"{name} is not a threshold the page can change")
            default = config.get(name)
            value = type(default)(value) if isinstance(default, int | float) else value
            if (why := config.out_of_range(name, value)) is not None:
                raise ValueError(why)
            out[name] = value
        return out

    def set_detectors(self, overrides: dict[str, Any], disabled: set[str] | frozenset[str]) -> None:
        """New thresholds (only those differing from config are kept) and switches, for the running capture."""
        bad = set(disabled) - set(DETECTOR_NAMES)
        if bad:
            raise ValueError(f"unknown detector(s): {', '.join(sorted(bad))}")
        valid = {k: v for k, v in self._valid_overrides(overrides).items() if v != config.get(k)}
        self._save(DETECTORS_KIND, SETTINGS_DOC, {"overrides": valid, "disabled": sorted(disabled)})
        with self._lock:
            self.overrides, self.disabled = valid, frozenset(disabled)
        self.apply()

    def threshold(self, name: str) -> Any:
        """A threshold as the detectors use it now."""
        with self._lock:
            return self.overrides.get(name, config.get(name))

    # -- destinations -----------------------------------------------------------------------

    def set_destinations(self, values: dict[str, Any]) -> list[str]:
        """The page's destination settings (PAGE_FIELDS; an empty value means the config's); errors."""
        for name, value in values.items():
            if name not in PAGE_FIELDS:
                raise ValueError(f"{name} is not a destination setting")
            if value not in ("", None) and (why := config.out_of_range(name, value)) is not None:
                raise ValueError(f"{name}: {why}")
        kept = {k: v for k, v in values.items() if v not in ("", None)}
        self._save(NOTIFY_KIND, SETTINGS_DOC, kept)
        with self._lock:
            self.destinations = kept
        return self.notifier.configure(kept)
