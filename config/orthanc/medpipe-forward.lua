-- Orthanc (compose service `orthanc`): forward every new study to the medpipe gateway once it is stable
-- (no new instance for StableAge seconds). The gateway's SCP acknowledges each instance once it is spooled to disk
-- and sends its structured report back to this Orthanc (C-STORE, --results-to dimse://ORTHANC@orthanc:4242).
-- SR and SC objects the gateway itself produced are not sent back to it.
function OnStableStudy(studyId, tags, metadata)
  local series = ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))
  local forward = {}
  for i, s in pairs(series) do
    local modality = s['MainDicomTags']['Modality']
    if modality ~= 'SR' and s['MainDicomTags']['Manufacturer'] ~= 'medpipe' then
      table.insert(forward, s['ID'])
    end
  end
  if #forward > 0 then
    RestApiPost('/modalities/medpipe/store', DumpJson({Resources = forward, Synchronous = false}))
  end
end
