// The heat map opacity control: the only script on the page (no framework, no build step).
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("input.opacity").forEach(function (slider) {
    var overlay = document.getElementById(slider.dataset.target);
    function apply() {
      overlay.style.opacity = String(slider.value / 100);
      slider.setAttribute("aria-valuetext", slider.value + " percent");
    }
    slider.addEventListener("input", apply);
    apply();
  });
});
