"""Investigating the traffic: filters, change explainer, capture health (issue 15). No Streamlit here."""
