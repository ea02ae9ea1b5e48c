"""The family tree drawn as inline SVG: ancestors on top, the model at the bottom, methods on the edges.

Self-contained markup (no script, no fonts or images from the network), so it renders in the page
offline and in any HTML viewer. Each generation is one row; a node links to its Hub page.
"""

from __future__ import annotations

import html

from ..lineage import Lineage

NODE_H, ROW_GAP, COL_GAP, MARGIN = 34, 70, 24, 16
CHAR_W, MAX_CHARS = 7.2, 42
LABEL_AT = 0.42  # edge labels sit this far from the parent, so labels of parents of one child do not meet


def _short(repo: str) -> str:
    return repo if len(repo) <= MAX_CHARS else repo[:MAX_CHARS - 1] + "…"


def _levels(tree: Lineage) -> dict[str, int]:
    """Each model's row: its longest path down to a root, so every parent sits above all of its children."""
    levels = {repo: (0 if repo in tree.roots else node.depth) for repo, node in tree.nodes.items()}
    for _ in range(len(tree.nodes)):  # longest paths in a DAG; the bound also ends any cycle a card could make
        changed = False
        for edge in tree.edges:
            if edge.parent in levels and edge.child in levels and levels[edge.parent] < levels[edge.child] + 1:
                levels[edge.parent] = min(levels[edge.child] + 1, len(tree.nodes))
                changed = True
        if not changed:
            break
    return levels


def render_svg(tree: Lineage) -> str:
    """The tree as an <svg> element (a message paragraph when there is no tree)."""
    if not tree.nodes:
        return "<p>No family tree: the model's card names no parents.</p>"
    rows: dict[int, list[str]] = {}
    levels = _levels(tree)
    for node in tree.nodes.values():
        rows.setdefault(levels[node.repo], []).append(node.repo)
    deepest = max(rows)
    widths = {r: max(90.0, len(_short(r)) * CHAR_W + 20) for r in tree.nodes}
    row_widths = {d: sum(widths[r] for r in repos) + COL_GAP * (len(repos) - 1) for d, repos in rows.items()}
    spans = [levels[e.child] + 1 < levels[e.parent] for e in tree.edges if e.parent in levels and e.child in levels]
    bend = max(widths.values()) / 2 + 40 if any(spans) else 0.0  # edges that skip a row curve out to the right
    width = max(row_widths.values()) + 2 * MARGIN + bend
    height = (deepest + 1) * NODE_H + deepest * ROW_GAP + 2 * MARGIN
    boxes: dict[str, tuple[float, float, float]] = {}  # repo -> (x, y, w)
    for depth, repos in rows.items():
        x = (width - bend - row_widths[depth]) / 2
        y = MARGIN + (deepest - depth) * (NODE_H + ROW_GAP)
        for repo in repos:
            boxes[repo] = (x, y, widths[repo])
            x += widths[repo] + COL_GAP
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="lineage" role="img" width="{width:.0f}" '
           f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" font-family="sans-serif" font-size="12">',
           f"<title>Family tree of {html.escape(', '.join(tree.roots))}</title>",
           '<defs><marker id="lineage-arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
           'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#6b7280"/></marker></defs>']
    for edge in tree.edges:
        if edge.parent not in boxes or edge.child not in boxes:
            continue
        px, py, pw = boxes[edge.parent]
        cx, cy, cw = boxes[edge.child]
        x1, y1, x2, y2 = px + pw / 2, py + NODE_H, cx + cw / 2, cy
        if y2 <= y1:  # a parent drawn at or below its child (a cycle in the cards): draw sideways
            y1, y2 = py + NODE_H / 2, cy + NODE_H / 2
        if levels[edge.child] + 1 < levels[edge.parent]:  # skips rows: a curve beside the nodes in between
            x1, x2 = px + pw, cx + cw
            dx = bend
            shape = (f'<path d="M{x1:.1f},{py + NODE_H / 2:.1f} C{x1 + dx:.1f},{py + NODE_H / 2:.1f} '
                     f'{x2 + dx:.1f},{cy + NODE_H / 2:.1f} {x2:.1f},{cy + NODE_H / 2:.1f}" fill="none" ')
            lx, ly = (x1 + x2) / 2 + 0.75 * dx, (py + cy + NODE_H) / 2
        else:
            shape = f'<path d="M{x1:.1f},{y1:.1f} L{x2:.1f},{y2:.1f}" fill="none" '
            lx, ly = x1 + (x2 - x1) * LABEL_AT, y1 + (y2 - y1) * LABEL_AT
        label = html.escape(edge.label)
        lw = len(edge.label) * 6.6 + 10
        out += [f'<g class="lineage-edge" data-parent="{html.escape(edge.parent)}" '
                f'data-child="{html.escape(edge.child)}">',
                shape + 'stroke="#6b7280" stroke-width="1.4" marker-end="url(#lineage-arrow)"/>',
                f'<rect x="{lx - lw / 2:.1f}" y="{ly - 9:.1f}" width="{lw:.1f}" height="18" rx="4" fill="#fef3c7" '
                'stroke="#d97706" stroke-width="0.8"/>',
                f'<text class="lineage-method" x="{lx:.1f}" y="{ly + 4:.1f}" text-anchor="middle" '
                f'fill="#92400e">{label}</text>', "</g>"]
    for repo, (x, y, w) in boxes.items():
        node = tree.nodes[repo]
        root = repo in tree.roots
        dash = ' stroke-dasharray="4 3"' if node.unavailable else ""
        fill = "#dbeafe" if root else "#f3f4f6"
        tip = repo + (f" (licence: {node.license})" if node.license else "") + (
            f" — {node.unavailable}" if node.unavailable else "")
        out += [f'<a class="lineage-node" href="https://huggingface.co/{html.escape(repo)}" target="_blank" '
                f'data-repo="{html.escape(repo)}">',
                f"<title>{html.escape(tip)}</title>",
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{NODE_H}" rx="6" fill="{fill}" '
                f'stroke="#374151" stroke-width="{1.6 if root else 1}"{dash}/>',
                f'<text x="{x + w / 2:.1f}" y="{y + NODE_H / 2 + 4:.1f}" text-anchor="middle" fill="#111827">'
                f"{html.escape(_short(repo))}</text>", "</a>"]
    out.append("</svg>")
    note = ('<p class="lineage-note">The tree stops at its size limit; open a model to see its own tree.</p>'
            if tree.truncated else "")
    return '<div class="lineage-tree" style="overflow-x:auto">' + "".join(out) + "</div>" + note
