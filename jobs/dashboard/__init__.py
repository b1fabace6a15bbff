"""The run dashboard (`moeforge dashboard`): runs.py reads run directories, server.py serves the
pages and their JSON, static/ holds the pages and the script that draws them with plotly.js."""
