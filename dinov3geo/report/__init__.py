"""Self-contained HTML reports (figures as embedded PNGs, tables, links to outputs) and a headless check.

``build_report(sections, "report.html")`` writes the page; :mod:`dinov3geo.report.figures` draws the maps
and curves; :mod:`dinov3geo.report.browser` renders a report in headless Chromium.
"""

from dinov3geo.report.build import (
    Figure,
    Link,
    Section,
    Table,
    build_report,
    raster_area_ha,
    render_report,
    section_from_spec,
)

__all__ = ["Figure", "Link", "Section", "Table", "build_report", "raster_area_ha", "render_report",
           "section_from_spec"]
