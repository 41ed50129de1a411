// The QC review page (served by cbp_platform/qc/app.py; its configuration comes in the page's JSON data block).
"use strict";
(function () {
  const cfg = JSON.parse(document.getElementById("cbp-config").textContent);
  const $ = (id) => document.getElementById(id);
  const REVIEWER_KEY = "cbp-qc-reviewer";
  let items = [];
  let sel = 0;
  let rejecting = false;
  let busy = false;
  let zoomed = false;

  function msg(text, kind) {
    const m = $("message");
    m.textContent = text;
    m.className = kind || "info";
  }

  function show(v, digits) {
    if (v === null || v === undefined || v === "") return "\u2013";
    if (typeof v === "number" && digits !== undefined) return v.toFixed(digits);
    return String(v);
  }

  function when(iso) {
    return iso ? iso.replace("T", " ").slice(0, 16) + " UTC" : "";
  }

  function decisionText(it) {
    if (!it.decision) return "not reviewed";
    const what = it.decision === "reject" ? "rejected (" + it.reason + ")" : "accepted";
    return what + " by " + it.reviewer + (it.reviewed_at ? ", " + when(it.reviewed_at) : "");
  }

  // the queue's decision cell: "accept", or "reject:" and the reason under it; "(outdated)" after either
  function decisionCell(tr, it) {
    const td = cell(tr, "decision", "");
    if (it.decision) {
      const what = document.createElement("span");
      what.className = "what";
      what.textContent = it.decision === "reject" ? "reject:" : "accept";
      td.appendChild(what);
      if (it.decision === "reject") {
        const why = document.createElement("span");
        why.className = "reason";
        breakable(why, show(it.reason));
        td.append(" ", why);
      }
    }
    if (it.outdated) {
      const old = document.createElement("span");
      old.className = "outdated";
      old.textContent = "(outdated)";
      td.append(it.decision ? " " : "", old);
    }
    return td;
  }

  // a line may break after . _ - (batch keys, reason codes) rather than anywhere in a word
  function breakable(parent, text) {
    text.split(/(?<=[._-])/).forEach((part, k) => {
      if (k) parent.appendChild(document.createElement("wbr"));
      parent.appendChild(document.createTextNode(part));
    });
  }

  function cell(tr, cls, text, title) {
    const td = document.createElement("td");
    td.className = cls;
    breakable(td, text);
    if (title) td.title = title;
    tr.appendChild(td);
    return td;
  }

  function flagLines(flags) {
    // one flag a line, each kept with its z ("a z 9.5; b z 4.1" as the warehouse writes them)
    return flags.split("; ").map((f) => f.replace(/ z (?=\S+$)/, "\u00a0z\u00a0")).join("\n");
  }

  function batchRank(it) {
    return "rank " + show(it.triage_rank) + " in batch " + show(it.batch_key);
  }

  function renderQueue() {
    const body = $("queue-body");
    body.replaceChildren();
    items.forEach((it, i) => {
      const tr = document.createElement("tr");
      tr.dataset.pseudonym = it.pseudonym;
      tr.dataset.batch = it.batch_key;
      tr.dataset.score = String(it.triage_score);
      tr.dataset.position = String(i + 1);
      tr.dataset.rank = show(it.triage_rank);
      if (it.decision) tr.classList.add(it.decision);
      // # is the position in the queue as sorted (across batches); the rank within the batch is its tooltip
      cell(tr, "pos", String(i + 1), "position " + (i + 1) + " in this queue; " + batchRank(it));
      cell(tr, "pseudonym", it.pseudonym);
      const where = cell(tr, "batch", show(it.batch_key));
      const site = document.createElement("span");
      site.className = "site";
      site.textContent = show(it.site);
      where.appendChild(site);
      cell(tr, "score", show(it.triage_score, 2));
      const flags = cell(tr, "flags", "", it.triage_flags);
      flags.textContent = it.triage_flags ? flagLines(it.triage_flags) : show(null);
      decisionCell(tr, it);
      tr.addEventListener("click", () => select(i));
      body.appendChild(tr);
    });
    const n = items.length;
    const status = " in this queue (" + cfg.filters.status + ")";
    $("count").textContent = n ? n + " participant" + (n === 1 ? "" : "s") + status : "nothing" + status;
  }

  function fact(dl, label, value, cls) {
    const dt = document.createElement("dt");
    dt.textContent = label;
    const dd = document.createElement("dd");
    if (cls) {
      const span = document.createElement("span");
      span.className = "badge " + cls;
      span.textContent = value;
      dd.appendChild(span);
    } else {
      dd.textContent = value;
    }
    dd.dataset.field = label;
    dl.append(dt, dd);
  }

  function renderDetail() {
    const it = items[sel];
    const img = $("d-image");
    const dl = $("d-facts");
    dl.replaceChildren();
    if (!it) {
      $("d-title").textContent = "no participant selected";
      img.hidden = true;
      img.removeAttribute("src");
      closeZoom();
      return;
    }
    $("d-title").textContent = it.pseudonym + "  (" + (sel + 1) + " of " + items.length + ")";
    img.hidden = false;
    img.src = imageUrl(it);
    if (zoomed) showZoom();
    fact(dl, "triage score", show(it.triage_score, 2));
    fact(dl, "queue position", (sel + 1) + " of " + items.length);
    fact(dl, "triage rank", show(it.triage_rank) + " in batch " + show(it.batch_key));
    fact(dl, "flags", show(it.triage_flags));
    fact(dl, "lean muscle", show(it.lean_ml, 1) + " ml");
    fact(dl, "InterMAT", show(it.imat_pct, 2) + " %");
    fact(dl, "model", show(it.model_name) + " (" + show(it.model_sha256 ? it.model_sha256.slice(0, 12) : null) + ")");
    fact(dl, "site / delivery", show(it.site) + " / " + show(it.delivery_id));
    fact(dl, "decision", decisionText(it), it.decision || null);
    if (it.decision && it.note) fact(dl, "note", it.note);
    if (it.outdated) fact(dl, "outdated", "an earlier review was of a replaced label map: not applied", "outdated");
  }

  function imageUrl(it) {
    return "/qc/" + encodeURIComponent(it.pseudonym) + ".png";
  }

  // The full-size view: the QC image at a whole multiple of its pixels (1:1 at least; 2:1 and more where the
  // window holds it), over the page. z or a click opens it; Esc, z or a click closes it; j / k walk the queue.
  function zoomScale(img) {
    const w = img.naturalWidth;
    const h = img.naturalHeight;
    if (!w || !h) return 1;
    const fit = Math.min((window.innerWidth - 24) / w, (window.innerHeight - 56) / h);
    return Math.max(1, Math.floor(fit));
  }

  function fitZoom() {
    const img = $("zoom-image");
    const s = zoomScale(img);
    if (img.naturalWidth) {
      img.style.width = img.naturalWidth * s + "px";
      img.style.height = img.naturalHeight * s + "px";
    }
    img.dataset.scale = String(s);
    zoomCaption(s + ":1");
  }

  function zoomCaption(scale) {
    const it = items[sel];
    if (!it) return;
    $("zoom-caption").textContent = it.pseudonym + "  (" + (sel + 1) + " of " + items.length + ")" +
      (scale ? ", " + scale : "") + ".  Esc or z closes (or a click); j / k: next, previous.";
  }

  function showZoom() {
    const it = items[sel];
    if (!it) { closeZoom(); return; }
    const img = $("zoom-image");
    const url = imageUrl(it);
    if (img.getAttribute("src") !== url) {
      img.removeAttribute("style");
      delete img.dataset.scale;
      img.src = url;
    }
    zoomCaption("");                            // until the image has loaded (its scale is known then)
    if (img.complete && img.naturalWidth) fitZoom();
  }

  function openZoom() {
    if (!items[sel]) return;
    zoomed = true;
    $("zoom").hidden = false;
    showZoom();
  }

  function closeZoom() {
    zoomed = false;
    $("zoom").hidden = true;
  }

  function select(i) {
    if (!items.length) { sel = 0; renderDetail(); return; }
    sel = Math.max(0, Math.min(items.length - 1, i));
    const rows = $("queue-body").children;
    for (let k = 0; k < rows.length; k++) rows[k].classList.toggle("selected", k === sel);
    if (rows[sel]) rows[sel].scrollIntoView({block: "nearest"});
    renderDetail();
  }

  function reviewerName() {
    const name = $("reviewer").value.trim();
    if (!name) {
      msg("Enter your name in the reviewer field first: every decision names its reviewer.", "error");
      $("reviewer").focus();
    }
    return name;
  }

  function openReject() {
    if (!items[sel] || !reviewerName()) return;
    rejecting = true;
    $("reject-panel").hidden = false;
    msg("Reject " + items[sel].pseudonym + ": press the reason's key (Esc cancels).", "info");
  }

  function closeReject() {
    rejecting = false;
    $("reject-panel").hidden = true;
  }

  async function decide(decision, reason) {
    const it = items[sel];
    if (!it || busy) return;
    const reviewer = reviewerName();
    if (!reviewer) return;
    busy = true;
    try {
      const r = await fetch("/api/review", {
        method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({pseudonym: it.pseudonym, decision: decision, reason: reason || null,
                              note: $("note").value, reviewer: reviewer, label_sha256: it.label_sha256})});
      const body = await r.json().catch(() => ({}));
      if (!r.ok) {
        msg("Not recorded: " + (body.error || ("HTTP " + r.status)), "error");
        return;
      }
      const rev = body.review;
      Object.assign(it, {decision: rev.decision, reason: rev.reason, note: rev.note, reviewer: rev.reviewer,
                         reviewed_at: rev.reviewed_at, outdated: false, n_reviews: (it.n_reviews || 0) + 1});
      try { localStorage.setItem(REVIEWER_KEY, reviewer); } catch (e) { /* storage disabled: fine */ }
      $("note").value = "";
      const last = sel + 1 >= items.length;
      renderQueue();
      select(last ? sel : sel + 1);
      msg(it.pseudonym + ": " + decisionText(it) + (last ? ". End of the queue." : ""), "ok");
    } catch (e) {
      msg("Not recorded: the review app did not answer (" + e + ")", "error");
    } finally {
      busy = false;
    }
  }

  function fillSelect(id, values, current, withAll) {
    const s = $(id);
    s.replaceChildren();
    if (withAll) s.appendChild(new Option("all", ""));
    values.forEach((v) => s.appendChild(new Option(v, v)));
    if (current && !values.includes(current)) s.appendChild(new Option(current, current));
    s.value = current || "";
  }

  function applyFilters() {
    const p = new URLSearchParams();
    for (const k of ["batch", "site", "model", "status"]) {
      const v = $("f-" + k).value;
      if (v) p.set(k, v);
    }
    location.assign("/" + (p.toString() ? "?" + p.toString() : ""));
  }

  function setupStatic() {
    const saved = (() => { try { return localStorage.getItem(REVIEWER_KEY) || ""; } catch (e) { return ""; } })();
    $("reviewer").value = cfg.reviewer || saved;
    $("reviewer").addEventListener("change", () => {
      try { localStorage.setItem(REVIEWER_KEY, $("reviewer").value.trim()); } catch (e) { /* disabled */ }
    });
    const ul = $("reasons");
    const hl = $("help-reasons");
    cfg.reasons.forEach((r) => {
      const li = document.createElement("li");
      const k = document.createElement("kbd");
      k.textContent = r.key;
      li.append(k, " " + r.code + ": " + r.description);
      li.dataset.reason = r.code;
      li.addEventListener("click", () => { closeReject(); decide("reject", r.code); });
      ul.appendChild(li);
      const dt = document.createElement("dt");
      const k2 = document.createElement("kbd");
      k2.textContent = r.key;
      dt.appendChild(k2);
      const dd = document.createElement("dd");
      dd.textContent = r.code;
      dd.title = r.description;
      hl.append(dt, dd);
    });
    $("b-accept").addEventListener("click", () => decide("accept"));
    $("b-reject").addEventListener("click", () => openReject());
    $("b-zoom").addEventListener("click", () => openZoom());
    $("d-image").addEventListener("click", () => openZoom());
    $("zoom").addEventListener("click", () => closeZoom());
    $("zoom-image").addEventListener("load", () => { if (zoomed) fitZoom(); });
    window.addEventListener("resize", () => { if (zoomed) fitZoom(); });
    fillSelect("f-status", cfg.statuses, cfg.filters.status, false);
    for (const k of ["batch", "site", "model", "status"]) $("f-" + k).addEventListener("change", applyFilters);
  }

  document.addEventListener("keydown", (e) => {
    const t = e.target;
    if (t && (t.tagName === "INPUT" || t.tagName === "SELECT" || t.tagName === "TEXTAREA")) {
      if (e.key === "Escape" || (e.key === "Enter" && t.tagName === "INPUT")) { t.blur(); e.preventDefault(); }
      return;
    }
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    if (zoomed) {
      switch (e.key) {
        case "Escape": case "z": closeZoom(); break;
        case "j": case "ArrowDown": select(sel + 1); break;
        case "k": case "ArrowUp": select(sel - 1); break;
        case "a": case "r": case "n": case "?": closeZoom(); return handleKey(e);   // acts on the page below
        default: return;
      }
      e.preventDefault();
      return;
    }
    handleKey(e);
  });

  function handleKey(e) {
    if (rejecting) {
      const reason = cfg.reasons.find((r) => r.key === e.key);
      if (reason) {
        closeReject();
        decide("reject", reason.code);
      } else if (e.key === "Escape") {
        closeReject();
        msg("Rejection cancelled.", "info");
      } else {
        return;
      }
      e.preventDefault();
      return;
    }
    switch (e.key) {
      case "j": case "ArrowDown": select(sel + 1); break;
      case "k": case "ArrowUp": select(sel - 1); break;
      case "a": decide("accept"); break;
      case "r": openReject(); break;
      case "n": if (items[sel]) $("note").focus(); break;
      case "z": openZoom(); break;
      case "?": $("help").classList.toggle("hidden"); break;
      default: return;
    }
    e.preventDefault();
  }

  async function load() {
    const p = new URLSearchParams();
    for (const k of ["batch", "site", "model", "status"]) if (cfg.filters[k]) p.set(k, cfg.filters[k]);
    try {
      const r = await fetch("/api/queue?" + p.toString());
      const body = await r.json().catch(() => ({}));
      if (!r.ok) {
        msg("The queue could not be read: " + (body.error || ("HTTP " + r.status)), "error");
        return;
      }
      fillSelect("f-batch", body.options.batch, cfg.filters.batch, true);
      fillSelect("f-site", body.options.site, cfg.filters.site, true);
      fillSelect("f-model", body.options.model, cfg.filters.model, true);
      items = body.items;
      renderQueue();
      select(0);
      if (!$("reviewer").value.trim()) msg("Enter your name in the reviewer field, then review with the keys.", "info");
    } catch (e) {
      msg("The queue could not be read (" + e + ")", "error");
    } finally {
      document.body.dataset.ready = "1";
    }
  }

  setupStatic();
  load();
})();
