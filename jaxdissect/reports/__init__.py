"""Dissection report artefacts.

* :mod:`~jaxdissect.reports.strips`: masked thumbnails and unit image strips;
* :mod:`~jaxdissect.reports.bargraph`: the concept bar graph (``concepts_99.svg``);
* :mod:`~jaxdissect.reports.report_json`: ``report.json`` in the original's format;
* :mod:`~jaxdissect.reports.html`: the run's ``index.html`` with sortable, filterable unit tables;
* :mod:`~jaxdissect.reports.summary`: interpretable units and unique concepts per layer.
"""
