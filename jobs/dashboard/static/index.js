"use strict";
// The index page: every run under the dashboard's directories, refreshed every few seconds.
function ago(t, now) {
  if (t == null) return "none yet";
  const s = Math.max(0, now - t);
  return s < 90 ? `${s.toFixed(0)} s ago` : s < 5400 ? `${(s / 60).toFixed(0)} min ago` : `${(s / 3600).toFixed(1)} h ago`;
}

async function refresh() {
  try {
    const runs = await (await fetch("/api/runs")).json();
    const body = document.querySelector("#runs tbody");
    body.replaceChildren();
    for (const r of runs) {
      const tr = document.createElement("tr");
      const link = document.createElement("a");
      link.href = `/run/${encodeURIComponent(r.id)}`;
      link.textContent = r.id;
      const stages = r.stages.map(s => `${s.name} (${s.state})`).join(" → ");
      // The driver's heartbeat (jobs/heartbeat.py): "dead" = it stopped without a final word.
      const live = r.liveness || { state: "unknown" };
      const driver = live.state === "unknown" ? "unknown (no heartbeat)" :
        `${live.state === "dead" ? "DEAD" : live.state}, heartbeat ${ago(live.time, r.now)}`;
      const cells = [link, driver, stages, ago(r.metrics_mtime, r.now), r.path];
      for (const c of cells) {
        const td = document.createElement("td");
        if (c instanceof Node) td.appendChild(c); else td.textContent = c;
        tr.appendChild(td);
      }
      if (live.state === "dead") tr.children[1].className = "state-failed";
      body.appendChild(tr);
    }
    document.getElementById("empty").hidden = runs.length > 0;
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    document.getElementById("updated").textContent = `dashboard server unreachable (${e})`;
  }
  setTimeout(refresh, 3000);
}
refresh();
