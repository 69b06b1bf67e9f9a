"""A deterministic timer for the measured-policy tests: what a site or a whole model takes, from a table."""
from rewrite.timing import EXACT, SiteRun


def table_timer(site_ms: dict, exact_ms=1.0, rest_ms=10.0, log=None, sites=2):
    """Site runs from a table; the model (``sites`` sites): ``rest_ms`` plus each site's time (exact or its
    chosen mixer)."""
    def timer(runs):
        if log is not None:
            log.append(list(runs))
        out = {}
        for label in runs:
            if isinstance(label, SiteRun):
                out[label] = (exact_ms if label.action == EXACT else site_ms[label.action]) / 1e3
            else:
                out[label] = (rest_ms + exact_ms * (sites - len(label.plan)) + sum(site_ms[a] for *_, a in label.plan)) / 1e3
        return out
    return timer
