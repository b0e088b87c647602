"""Plain-text tables, shared by every layer that prints one (law discovery, run and sweep
summaries)."""


def text_table(rows) -> str:
    """Left-aligned columns, two spaces apart (`rows`: equal-length tuples of strings, the
    first one the header)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
